"""Running a pipeline on a Ray cluster: the shared-state check and Ray Jobs SDK helpers.

A cluster changes *where* a pipeline runs, never *what* it does: the same spec and the same commands,
submitted through the Ray Jobs API, with state on storage that every node sees.
"""

from gigamamba.cluster.shared_state import check_shared_state

__all__ = ["check_shared_state"]
