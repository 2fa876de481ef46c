"""Text generation from an exported artifact through onnxruntime-genai."""

from __future__ import annotations

from collections.abc import Iterator

from d2mc.errors import require_module


def stream_tokens(artifact, prompt: str, *, max_new_tokens: int = 64, sample: bool = False,
                  temperature: float = 0.7, top_p: float = 0.9, top_k: int = 50, seed: int = 0,
                  chat: bool = False) -> Iterator[str]:
    """Yield the decoded text of each new token as it is generated."""
    from d2mc.targets.onnxruntime import read_artifact

    read_artifact(artifact)
    og = require_module("onnxruntime_genai", "d2mc run", "onnxruntime-genai")
    model = og.Model(str(artifact))
    tokenizer = og.Tokenizer(model)
    if chat:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(artifact))
        prompt = hf.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                        add_generation_prompt=True)
    ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    options = {"max_length": len(ids) + max_new_tokens, "do_sample": sample}
    if sample:
        options.update(temperature=temperature, top_p=top_p, top_k=top_k, random_seed=seed)
    params.set_search_options(**options)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    stream = tokenizer.create_stream()
    while not generator.is_done():
        generator.generate_next_token()
        yield stream.decode(generator.get_next_tokens()[0])
