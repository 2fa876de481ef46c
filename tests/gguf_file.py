"""Write a tiny Llama model as a GGUF file, the way llama.cpp's converter lays it out."""

from __future__ import annotations

from pathlib import Path


def _permute_rows(weight, n_heads: int):
    # llama.cpp stores q/k rows interleaved per rotary pair; transformers undoes this on load
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_llama_gguf(model, path: Path) -> Path:
    """Save ``model`` (a LlamaForCausalLM) as an fp32 GGUF file with a placeholder vocabulary."""
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_vocab_size(c.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    writer.add_token_types([1] * c.vocab_size)
    writer.add_token_scores([0.0] * c.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        prefix = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_q.weight",
                          _permute_rows(sd[prefix + "self_attn.q_proj.weight"], c.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight",
                          _permute_rows(sd[prefix + "self_attn.k_proj.weight"], c.num_key_value_heads))
        for hf, gg in names.items():
            writer.add_tensor(f"blk.{i}.{gg}.weight", sd[f"{prefix}{hf}.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
