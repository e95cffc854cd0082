"""Tiny random Qwen3 checkpoints built with `transformers` (the independent reference)."""
import torch
import transformers

TINY = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    max_position_embeddings=256,
)


def make_checkpoint(path, seed=0, **overrides):
    """Saves a random float32 Qwen3ForCausalLM to `path`; returns the torch model (eval mode)."""
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(**{**TINY, **overrides})
    model = transformers.Qwen3ForCausalLM(config).float().eval()
    with torch.no_grad():  # HF initialises norms to 1; perturb them so the test sees their weights
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path, safe_serialization=True)
    return model


def torch_logits(model, tokens):
    """Reference logits [B, T, V] as numpy float32 for int tokens [B, T]."""
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
