"""The processes of a tensor-parallel worker: rank 0 drives, followers replay its steps
(the sharded layers they run live in ``worker_svc.parallel``)."""
