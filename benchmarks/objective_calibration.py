"""How well do the cheap refusal objectives predict judged refusals? (demo model, val prompts)

Usage::

    flock /work/notes/heavy.lock python benchmarks/objective_calibration.py collect --work W
    python benchmarks/objective_calibration.py analyse --work W [--out benchmarks/results]

``collect`` (heavy: the demo model, ~25 min on 2 cores) computes directions from the built-in
train split, then for a dozen edits spanning the refusal boundary (one direction at several
strengths and strength profiles, other layers' directions, and two points found by the
descent on strengths) measures on the harmful *validation* prompts

* the next-token refusal probability (the old proxy),
* the teacher-forced probability of opening with the model's own refusal openings, for several
  opening lengths and counts,
* the final hidden state at the last prompt token (for a probe),
* greedy answers of 128 tokens, judged by the marker judge (also on their first 64 tokens);

and the first-token KL on the built-in harmless validation prompts and on real instructions
(the first Alpaca prompts of ``/work/shared/data``), plus affine against plain edits. Nothing
here reads an evaluation split. ``analyse`` (light) compares the predictors with the judge:
per-trial rank correlation (Spearman) of the mean prediction with the judged rate, per-prompt
AUC, and a reliability table of predicted against judged rates; a logistic probe on the hidden
state is scored leave-one-edit-out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from abliterate.search.calibration import auc, reliability, spearman

OPENING_CONFIGS = [(3, 1), (4, 1), (4, 2), (4, 3), (6, 2)]  # (tokens, openings)


def _edits(candidates: Any, n_layers: int, site: str) -> dict[str, Any]:
    from abliterate.core.ablation import Ablation
    from abliterate.search.space import Profile

    at = lambda frac: round(frac * (n_layers - 1))  # noqa: E731  # 16, 10, 19 of 24 layers
    layer = at(16 / 23)
    d = candidates.direction(layer, site)

    def profile(a: Profile, m: Profile, direction: Any = d) -> Ablation:
        return Ablation(direction, 0.0, a.strengths(n_layers), m.strengths(n_layers))

    full = Profile(1.0, (n_layers - 1) / 2, float(n_layers), 1.0)
    off = Profile(0.0, 0.0, 1.0, 0.0)
    fading = Profile(1.0, float(layer), n_layers / 2, 0.5)
    out = {f"uniform {s}": Ablation.uniform(d, n_layers, s) for s in (1.0, 0.8, 0.6, 0.45)}
    out.update({
        "fading (seed)": profile(fading, fading),
        "attention only": profile(full, off),
        "mlp only": profile(off, full),
        "window 10-20": profile(*(Profile(1.0, 15 / 23 * (n_layers - 1), 5 / 23 * (n_layers - 1),
                                          1.0),) * 2),
        "layer 10 uniform": Ablation.uniform(candidates.direction(at(10 / 23), site), n_layers),
        "layer 19 uniform": Ablation.uniform(candidates.direction(at(19 / 23), site), n_layers),
    })  # fmt: skip
    return out


def _hidden(model: Any, tokenizer: Any, texts: list[str], edit: Any) -> torch.Tensor:
    """Final hidden state (after the final norm) at each prompt's last token, under ``edit``."""
    from abliterate.edit.hooks import edit_hooks
    from abliterate.model.forward import SharedPrefixScorer

    scorer = SharedPrefixScorer(model, tokenizer, texts, 32)
    out = torch.zeros(len(texts), scorer.anatomy.d_model)
    with torch.inference_mode(), edit_hooks(model, edit):
        for idx, batch, lengths in scorer.batches():
            h = scorer.forward(batch)
            out[idx] = h[torch.arange(len(idx)), lengths - 1].float().cpu()
    return out


def collect(work: Path, n_harmful: int, tokens: int, model_name: str) -> None:
    """The heavy phase (module docstring)."""
    from abliterate.core.ablation import Ablation
    from abliterate.data.chat import ChatSet
    from abliterate.data.prompts import builtin, resolve_prompts
    from abliterate.edit.hooks import edit_hooks
    from abliterate.eval.judges import MarkerJudge
    from abliterate.measure.activations import mean_activations
    from abliterate.measure.candidates import Candidates
    from abliterate.measure.refusal import RefusalOpenings, refusal_token_ids
    from abliterate.model.forward import generate
    from abliterate.model.loading import load_model
    from abliterate.search.descent import descend
    from abliterate.search.objective import judged_answers, search_model
    from abliterate.search.scoring import EditScorer, ScoringSet

    torch.set_num_threads(2)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    loaded = load_model(model_name)
    model, tok = loaded.model, loaded.tokenizer
    fmt = lambda s: ChatSet.format(tok, s)  # noqa: E731
    train_h, train_b = (
        fmt(builtin("harmful", "train").head(128)),
        fmt(builtin("harmless", "train").head(128)),
    )
    harmful = fmt(builtin("harmful", "val").head(n_harmful))
    harmless = fmt(builtin("harmless", "val").head(32))
    alpaca = fmt(resolve_prompts("/work/shared/data/alpaca_harmless_dev.jsonl", "harmless",
                                 "all", None).head(48))  # fmt: skip
    candidates = Candidates(
        harmful_mean=mean_activations(model, tok, train_h.texts, batch_size=32),
        harmless_mean=mean_activations(model, tok, train_b.texts, batch_size=32),
    )
    print(f"activations done at {time.perf_counter() - started:.0f} s", flush=True)
    judge, ids = MarkerJudge(), refusal_token_ids(tok)
    prompts = list(harmful.prompts.prompts)
    answers16, refused16 = judged_answers(model, tok, harmful.texts, prompts, judge)
    configs = {
        f"{t}x{k}": RefusalOpenings.from_answers(answers16, refused16, t, k)
        for t, k in OPENING_CONFIGS
    }
    n_layers = candidates.n_layers
    edits = _edits(candidates, n_layers, "pre")
    # Two points of the descent (bfloat16 copy, as the search runs it), and affine variants.
    bf16 = search_model(model, "bfloat16")
    descent_scorer = EditScorer(bf16, tok, ScoringSet(harmful.texts[:32], harmless.texts, ids,
                                                      configs["4x2"], batch_size=64))  # fmt: skip
    descents = {}
    for name in ("uniform 1.0", "fading (seed)"):
        result = descend(descent_scorer, edits[name], steps=8)
        edits[f"descent from {name}"] = result.edit
        descents[name] = result.to_dict()
    del bf16, descent_scorer
    means = candidates.writer_means()
    affine = {
        f"affine {k}": Ablation(
            e.direction, 0.0, e.attention, e.mlp, mode="affine", harmless_means=means
        )
        for k, e in edits.items()
        if k in ("uniform 1.0", "fading (seed)", "uniform 0.8")
    }
    print(f"edits ready at {time.perf_counter() - started:.0f} s", flush=True)
    scorers = {k: EditScorer(model, tok, ScoringSet(harmful.texts, harmless.texts, ids, o,
                                                    batch_size=64))
               for k, o in configs.items()}  # fmt: skip
    alpaca_scorer = EditScorer(model, tok, ScoringSet(harmful.texts[:8], alpaca.texts, ids,
                                                     configs["4x2"], batch_size=64))  # fmt: skip
    rows: dict[str, Any] = {}
    for name, edit in {**edits, **affine}.items():
        row: dict[str, Any] = {"edit": edit.to_dict()}
        for key, scorer in scorers.items():
            [s] = scorer.score([edit])
            row[f"open_{key}"] = s.refusal.tolist()
            row["first_token"] = s.first_token.tolist()
            row["kl_val"] = s.kl.tolist()
        [s] = alpaca_scorer.score([edit])
        row["kl_alpaca"] = s.kl.tolist()
        if not name.startswith("affine"):
            torch.save(_hidden(model, tok, harmful.texts, edit), work / f"hidden_{len(rows)}.pt")
            row["hidden"] = f"hidden_{len(rows)}.pt"
            with edit_hooks(model, edit):
                answers = generate(model, tok, harmful.texts, max_new_tokens=tokens,
                                   batch_size=n_harmful, desc=name)  # fmt: skip
            short = [tok.decode(tok(a, add_special_tokens=False).input_ids[:64]) for a in answers]
            row["answers"] = answers
            row["judged"] = judge(prompts, answers)
            row["judged_64"] = judge(prompts, short)
        rows[name] = row
        print(f"{name}: judged {sum(row.get('judged', [])) if 'judged' in row else '-'}, "
              f"open4x2 {sum(row['open_4x2']) / n_harmful:.3f}, first "
              f"{sum(row['first_token']) / n_harmful:.3f}, KL val {sum(row['kl_val']) / 32:.4f}, "
              f"alpaca {sum(row['kl_alpaca']) / 48:.4f} at {time.perf_counter() - started:.0f} s",
              flush=True)  # fmt: skip
        (work / "raw.json").write_text(json.dumps({
            "rows": rows, "descents": descents, "prompts": prompts,
            "openings": {k: o.to_dict(tok) for k, o in configs.items()},
        }, indent=1))  # fmt: skip
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)


# --- analysis ------------------------------------------------------------------------------------


def _num(value: float | None) -> str:
    """A statistic to 3 decimals, 'n/a' where it is undefined (None)."""
    return "n/a" if value is None else f"{value:.3f}"


def _fit_probe(xs: torch.Tensor, ys: torch.Tensor) -> Any:
    """L2-regularised logistic regression on standardised features; returns a predictor."""
    mu, sd = xs.mean(0), xs.std(0) + 1e-6
    w = torch.zeros(xs.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = ((xs - mu) / sd) @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, ys)
        loss = loss + 1e-2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda x: torch.sigmoid(((x - mu) / sd) @ w.detach() + b.detach())


def _probe_predictions(work: Path, rows: dict[str, Any]) -> dict[str, list[float]]:
    """Leave-one-edit-out logistic regression on the final hidden state."""
    names = [k for k, r in rows.items() if "hidden" in r]
    x = {k: torch.load(work / rows[k]["hidden"]) for k in names}
    y = {k: torch.tensor(rows[k]["judged"], dtype=torch.float32) for k in names}
    out = {}
    for held in names:
        probe = _fit_probe(
            torch.cat([x[k] for k in names if k != held]),
            torch.cat([y[k] for k in names if k != held]),
        )
        out[held] = probe(x[held]).tolist()
    return out


def analyse(work: Path, out: Path | None) -> None:
    """Tables of the collected data (module docstring)."""
    raw = json.loads((work / "raw.json").read_text())
    rows = {k: r for k, r in raw["rows"].items() if "judged" in r}
    probe = _probe_predictions(work, rows)
    predictors = ["first_token", *[f"open_{t}x{k}" for t, k in OPENING_CONFIGS], "probe"]
    lines = ["| edit | judged (128) | judged (64) | first token | " + " | ".join(
        f"open {t}x{k}" for t, k in OPENING_CONFIGS) + " | probe | KL val | KL alpaca |",
        "|---|" + "---:|" * (6 + len(OPENING_CONFIGS)) + "---:|"]  # fmt: skip
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    for name, r in rows.items():
        values = [mean(r[p]) if p != "probe" else mean(probe[name]) for p in predictors]
        lines.append(f"| {name} | {mean(r['judged']):.3f} | {mean(r['judged_64']):.3f} | "
                     + " | ".join(f"{v:.3f}" for v in values)
                     + f" | {mean(r['kl_val']):.4f} | {mean(r['kl_alpaca']):.4f} |")  # fmt: skip
    summary: dict[str, Any] = {}
    lines += ["", "| predictor | Spearman (per edit) | AUC (per prompt) | Brier (per prompt) |",
              "|---|---:|---:|---:|"]  # fmt: skip
    for p in predictors:
        per_edit = [mean(probe[n]) if p == "probe" else mean(r[p]) for n, r in rows.items()]
        judged = [mean(r["judged"]) for r in rows.values()]
        flat = [v for n, r in rows.items() for v in (probe[n] if p == "probe" else r[p])]
        labels = [bool(v) for r in rows.values() for v in r["judged"]]
        brier = mean([(s - y) ** 2 for s, y in zip(flat, labels, strict=True)])
        summary[p] = {"spearman": spearman(per_edit, judged), "auc": auc(flat, labels),
                      "brier": brier}  # fmt: skip
        lines.append(f"| {p} | {_num(summary[p]['spearman'])} | {_num(summary[p]['auc'])} | "
                     f"{brier:.3f} |")  # fmt: skip
    for p in ("first_token", "open_4x2"):
        lines += [
            "",
            f"Reliability of {p} (per prompt):",
            "",
            "| predicted | n | mean predicted | judged |",
            "|---|---:|---:|---:|",
        ]
        flat = [v for r in rows.values() for v in r[p]]
        labels = [bool(y) for r in rows.values() for y in r["judged"]]
        for row in reliability(flat, labels):
            lines.append(
                f"| [{row['lo']:.2f}, {row['hi']:.2f}) | {row['n']} | "
                f"{row['predicted']:.3f} | {row['judged']:.3f} |"
            )
    text = "\n".join(lines)
    print(text)
    print(json.dumps(raw["openings"], indent=1)[:2000])
    print(json.dumps(raw["descents"], indent=1)[:4000])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "objective_calibration.md").write_text(text + "\n")
        (out / "objective_calibration.json").write_text(json.dumps(
            {"summary": summary, "openings": raw["openings"], "descents": raw["descents"]},
            indent=1))  # fmt: skip


def main() -> None:
    """Command line (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["collect", "analyse"])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--n-harmful", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--model", default="demo", help="Model (a tiny one for a smoke run).")
    args = parser.parse_args()
    if args.phase == "collect":
        collect(args.work, args.n_harmful, args.tokens, args.model)
    else:
        analyse(args.work, args.out)


if __name__ == "__main__":
    main()
