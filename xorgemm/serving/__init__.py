"""Serving fine-tunes over one resident base: patch_model and the fine-tune bank (patch.py) over the state a
served model keeps (state.py). The top of the data flow: format -> resident -> ops -> nn -> serving."""
from xorgemm.serving.patch import add_finetune, memory_report, patch_model, remove_finetune, select, use
from xorgemm.serving.state import MemoryReport, PatchReport, ServedModel

__all__ = ["patch_model", "add_finetune", "remove_finetune", "memory_report", "select", "use", "MemoryReport",
           "PatchReport", "ServedModel"]
