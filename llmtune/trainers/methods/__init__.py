"""Training methods: which parameters train, how they are injected, saved, reloaded (and whether they merge).

* `bottleneck` — our own bottleneck adapters (LLM-Adapters, arXiv 2304.01933): series or parallel, after
  attention and/or MLP;
* `peft_methods` — typed options for what PEFT already implements: IA3, prefix tuning, LoRA variants
  (rsLoRA, PiSSA / OLoRA init, LoftQ), and the LoRA+ optimizer rule.

Importing this package imports neither torch nor PEFT.
"""
