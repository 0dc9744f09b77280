"""The fitness of experiments/mistral-7b.yaml, a stand-in: that experiment's models are described by
their config.json only (for `evomerge plan`), so it is planned, never run. Put your scorer here, or
use lm-eval tasks, when you point the experiment at real weights."""


def score(model, tokenizer):
    raise NotImplementedError("experiments/mistral-7b.yaml is a planning example: point it at real models first")
