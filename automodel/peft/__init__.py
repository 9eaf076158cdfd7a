from automodel.peft.lora import LoraConfig, apply_lora, is_peft_model, merge, unwrap

__all__ = ["LoraConfig", "apply_lora", "is_peft_model", "merge", "unwrap"]
