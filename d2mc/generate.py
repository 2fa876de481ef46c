"""Text generation from an exported artifact through onnxruntime-genai."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from d2mc.errors import OptionError, UserError, require_module


def stream_tokens(artifact, prompt: str, **options) -> Iterator[str]:
    """Yield the decoded text of each new token as it is generated (options as :func:`generate_ids`)."""
    for _token, text in generate_ids(artifact, prompt, **options):
        yield text


def generate_ids(artifact, prompt: str, *, max_new_tokens: int = 64, sample: bool = False,
                 temperature: float = 0.7, top_p: float = 0.9, top_k: int = 50, seed: int = 0,
                 chat: bool = False) -> Iterator[tuple[int, str]]:
    """Yield ``(token id, its text)`` for each new token (greedy, or sampled when ``sample``), as generated."""
    from d2mc.artifact import read_artifact

    if max_new_tokens < 1:
        raise OptionError(f"{{max_new_tokens}} must be at least 1 (got {max_new_tokens})")
    info = read_artifact(artifact)
    if info.get("flavour", "onnxruntime") != "onnxruntime":
        raise UserError(f"'{artifact}' is a {info['flavour']} artifact (plugin ops onnxruntime-genai cannot run): "
                        "export with --format onnxruntime to run it here")
    og = require_module("onnxruntime_genai", "d2mc run", "onnxruntime-genai")
    try:
        model = og.Model(str(artifact))
        tokenizer = og.Tokenizer(model)
    except Exception as exc:  # onnxruntime-genai raises plain RuntimeErrors for unreadable artifacts
        raise UserError(f"onnxruntime-genai cannot load '{artifact}' ({str(exc).splitlines()[0][:160]}): the "
                        "artifact is corrupt or incomplete; export it again") from None
    if chat:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(Path(artifact)))
        if not hf.chat_template:
            raise OptionError(f"the tokenizer of '{artifact}' has no chat template: drop {{chat}}")
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
        token = int(generator.get_next_tokens()[0])
        yield token, stream.decode(token)
