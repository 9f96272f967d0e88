"""Foreign checkpoints (placeholder)."""
def read_peft_prompt_learning(directory):
    return None
def read_adapterhub_prefix(directory):
    return None
