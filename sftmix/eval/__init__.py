"""The evaluation tasks; sftmix.eval.evaluate runs them (run_eval) and stores each result with its fingerprint.

    sftmix.eval.tasks        the evaluation sets: multiple-choice loaders, shots, prompts, MT-Bench questions
    sftmix.eval.mc           k-shot multiple choice by log-likelihood (shared-prefix key/value cache, Wilson CI)
    sftmix.eval.generation   batched generation with the chat template
    sftmix.eval.judged       MT-Bench and AlpacaEval through an LLM judge (sftmix.eval.judge)
"""
