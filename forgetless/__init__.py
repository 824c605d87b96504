"""forgetless: fine-tune LLMs on a domain without losing what they already knew."""

import logging

# bitsandbytes (an optional extra, imported by transformers/PEFT when installed) warns at import on CPUs with
# avx512_bf16 that an optional kernel fetched from the Hugging Face hub is missing; its built-in fallback is used,
# so the warning is noise on every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
