"""Export what trainers and quantizers wrote to where models are served: GGUF (llama.cpp), Ollama, merged HF.

    from llmtune.export import export, check_vllm
    export("runs/demo/run", "exported", format="gguf", dtype="q8_0")   # merged model -> model-q8_0.gguf
    for finding in check_vllm("runs/demo/run"):                        # what vLLM would refuse, and what to do
        print(finding)

Importing this package is light: torch, transformers, peft and gguf are imported by the calls that need them.
"""

from llmtune.export.api import FORMATS, GGUF_DTYPES, HF_DTYPES, ExportResult, export
from llmtune.export.source import ExportError, Source, resolve_source
from llmtune.export.vllm import VLLM_MAX_LORA_RANKS, VllmFinding, check_vllm

__all__ = [
    "FORMATS", "GGUF_DTYPES", "HF_DTYPES", "VLLM_MAX_LORA_RANKS", "ExportError", "ExportResult", "Source",
    "VllmFinding", "check_vllm", "export", "resolve_source",
]
