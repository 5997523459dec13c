"""Render chat messages to a prompt: the tokenizer's own chat template, or the plain template.

The plain template is used when the tokenizer has no chat template (stories260K's sentencepiece
tokenizer, llama2.c tokenizers). It is BOS followed by one line per message and an open assistant turn::

    <BOS>System: {content}
    User: {content}
    Assistant: {content}
    Assistant:

Each line is ``{Role}: {content}\\n`` with the role capitalized (``system``, ``developer``, ``user``,
``assistant``, ``tool``).
Tokenizers with a template (Hugging Face ``chat_template``) are rendered by ``transformers`` (with
the open assistant turn unless ``/tokenize`` asks ``add_generation_prompt: false``) and encoded without adding BOS again (the template writes it), with
the special tokens it writes parsed.
"""

from __future__ import annotations

from typing import Any, Sequence


def render_plain(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
  """The plain template's text (without BOS) for ``messages``: dicts with ``role`` and string ``content``."""
  text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
  return text + "Assistant:" if add_generation_prompt else text


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
                    ) -> list[int]:
  """Token ids of the prompt for ``messages``, with the tokenizer's template when it has one
  (``add_generation_prompt``: end with the open assistant turn)."""
  if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "apply_chat_template"):
    kw = {} if add_generation_prompt else {"add_generation_prompt": False}
    # the template writes special tokens (BOS, turn markers) as text: parse them
    return tokenizer.encode(tokenizer.apply_chat_template(list(messages), **kw), add_bos=False, parse_special=True)
  return tokenizer.encode(render_plain(messages, add_generation_prompt), add_bos=True)
