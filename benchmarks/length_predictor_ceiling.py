"""How much better could a prompt-side output-length predictor be on the bundled prompt sample?

"las-predicted" ranks by `PromptLengthPredictor` (hashed token n-grams, ridge on log length). With a
clairvoyant predictor the same policy gains far more (`scheduling_predicted.py`, policy
"las-predicted-perfect"), so this asks whether a better predictor is within reach. On the same 4
half/half splits as the sweep, the held-out Spearman correlation of predicted and true lengths for:

- "text": the shipped predictor;
- "family": the mean log length of the prompt's template family in the training half (what a
  predictor that only recognised the 12 task templates would know);
- "hidden <layers>": ridge regression (standardised features, dual form, ridge 1000) on the default
  model's own hidden states for the chat-formatted prompt (SmolLM2-135M-Instruct through
  transformers, fp32, CPU): the last prompt token's state at layers 10 and 20 and after the last
  layer, and the last layer's mean over the prompt. This is what a predictor reading the serving
  model's own prefill (as TRAIL-like schedulers do) could learn from.

Then, per family, the spread of the true lengths: what no prompt-side predictor can tell apart if
the family's prompts look alike.

Run:  .venv/bin/python benchmarks/length_predictor_ceiling.py [--splits 4] [--threads 2]
      (about 2 minutes on the 2-core CPU: one forward pass per prompt)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scheduling_predicted import scaled  # noqa: E402

from elastic_llm.model.checkpoint import DEFAULT_MODEL, resolve_checkpoint  # noqa: E402
from elastic_llm.scheduling.prompt_sample import (  # noqa: E402
    PromptSampleRow,
    fit_length_predictor,
    load_prompt_sample,
    split_prompt_sample,
)

RIDGE = 1000.0
LAYERS = (10, 20)  # hidden-state layers read at the last prompt token, besides the last layer


def hidden_features(rows: tuple[PromptSampleRow, ...], threads: int) -> dict[str, np.ndarray]:
    """{feature set: [rows, dim]} of the default model's hidden states for each row's prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(DEFAULT_MODEL), dtype=torch.float32).eval()
    sets: dict[str, list[np.ndarray]] = {f"hidden layer {k}": [] for k in LAYERS}
    sets["hidden last layer"], sets["hidden last layer, mean over prompt"] = [], []
    started = time.perf_counter()
    with torch.inference_mode():
        for index, row in enumerate(rows, 1):
            states = model(torch.tensor([row.prompt_token_ids]), output_hidden_states=True).hidden_states
            for k in LAYERS:
                sets[f"hidden layer {k}"].append(states[k][0, -1].numpy())
            sets["hidden last layer"].append(states[-1][0, -1].numpy())
            sets["hidden last layer, mean over prompt"].append(states[-1][0].mean(0).numpy())
            if index % 120 == 0:
                print(f"[features] {index}/{len(rows)} prompts, {time.perf_counter() - started:.0f} s", flush=True)
    return {name: np.stack(vectors) for name, vectors in sets.items()}


def ridge_predict(train: np.ndarray, targets: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Ridge regression on standardised features (dual form: rows, not dimensions)."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    z_train, z_test = (train - mean) / std, (test - mean) / std
    alpha = np.linalg.solve(z_train @ z_train.T + RIDGE * np.eye(len(targets)), targets - targets.mean())
    return z_test @ (z_train.T @ alpha) + targets.mean()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.splits < 1 or args.threads < 1:
        parser.error("need --splits >= 1 and --threads >= 1")
    rows = scaled(load_prompt_sample())
    features = hidden_features(rows, args.threads)
    index = {row.prompt_token_ids: k for k, row in enumerate(rows)}
    table: dict[str, list[float]] = {}
    for seed in range(args.splits):
        train, test = split_prompt_sample(rows, seed=seed)
        truth = [r.output_tokens for r in test]
        predictor = fit_length_predictor(train, seed=seed)
        scores = {"text": [predictor.predict_log_length(r.prompt_token_ids) for r in test]}
        by_family: dict[str, list[float]] = {}
        for r in train:
            by_family.setdefault(r.family, []).append(float(np.log(r.output_tokens)))
        scores["family"] = [float(np.mean(by_family[r.family])) for r in test]
        targets = np.log([r.output_tokens for r in train])
        train_rows = [index[r.prompt_token_ids] for r in train]
        test_rows = [index[r.prompt_token_ids] for r in test]
        for name, matrix in features.items():
            scores[name] = ridge_predict(matrix[train_rows], targets, matrix[test_rows]).tolist()
        for name, predicted in scores.items():
            table.setdefault(name, []).append(float(spearmanr(predicted, truth).statistic))
    print(f"## held-out Spearman over {args.splits} splits (each: fit on one half, score the other)")
    for name, values in table.items():
        print(f"{name:>38}: " + "  ".join(f"{v:.3f}" for v in values) + f"   (mean {np.mean(values):.3f})")
    print("## true lengths per family (x0.15, at least 4 tokens: the cap of 512 is 77)")
    families: dict[str, list[PromptSampleRow]] = {}
    for r in rows:
        families.setdefault(r.family, []).append(r)
    for family, members in sorted(families.items()):
        values = np.array([r.output_tokens for r in members])
        cut = np.mean([r.finish == "length" for r in members])
        print(f"{family:>10}: {len(values):3d} prompts, mean {values.mean():5.1f}, CV {values.std() / values.mean():.2f}, "
              f"min {values.min()}, max {values.max()}, cut at the cap {cut:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
