"""One line per MPI rank, then rank 0's summary: every rank adds 2**rank, so the allreduce is
2**size - 1 only when each rank took part, and the gathered host names say where each ran.

    srun --mpi=pmix -N 2 nsdf-run run nsdf/mpi:v1.0.0 -- python3 /opt/nsdf/allreduce.py
"""
import os
import socket

from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
# the node name Slurm gave this rank (on one machine, two slurmd share the host name)
where = f"{os.environ.get('SLURMD_NODENAME', '-')}/{socket.gethostname()}"
total = comm.allreduce(1 << rank, op=MPI.SUM)
hosts = comm.gather(where, root=0)
print(f"rank {rank} of {size} on {where}: allreduce {total}", flush=True)
comm.Barrier()
if rank == 0:
    ok = "ok" if total == (1 << size) - 1 else "MISSING RANKS"
    print(f"allreduce {ok}: {size} ranks, sum of 2**rank = {total}, hosts {','.join(hosts)}", flush=True)
