from automodel.common import is_peft_model, unwrap
from automodel.peft.lora import LoraConfig, apply_lora, merge

__all__ = ["LoraConfig", "apply_lora", "is_peft_model", "merge", "unwrap"]
