"""The option groups of how ``run`` chooses its edit: automatic selection among candidate
directions (:class:`SelectionOptions`) and the ``--optimize`` search (:class:`SearchOptions`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from abliterate.config.groups import Options
from abliterate.config.values import (
    Count,
    FiniteFloat,
    Index,
    PathOption,
    Sites,
    Text,
    problem,
)
from abliterate.types import SITES, RefusalObjective, SearchDType, Site


class SelectionOptions(Options):
    """Which candidate direction is removed, and how strongly (without ``--optimize``)."""

    sites: Sites = Field(
        SITES,
        description="Residual-stream sites at which candidate directions are taken "
        "(space- or comma-separated).",
    )
    kl_threshold: FiniteFloat = Field(
        0.1,
        gt=0,
        description="Selection prefers candidates whose validation first-token KL is at most this.",
    )
    refusal_filter: bool = Field(
        True,
        description="Compute directions from the harmful training prompts the unedited model "
        "refuses (next-token refusal probability above 0.5, at least --min-refused of the most "
        "likely refused), as Arditi et al. filter theirs: the prompts it answers anyway carry "
        "the topic's features but not refusal's. Off: every harmful training prompt.",
    )
    min_refused: Count = Field(
        16,
        description="With --refusal-filter: the fewest harmful prompts a direction is computed "
        "from; when the model refuses fewer, the ones it is most likely to refuse fill up.",
    )
    prune_last_layers: FiniteFloat = Field(
        0.2,
        ge=0,
        lt=1,
        description="Fraction of the last layers whose candidates are discarded (they tend to "
        "encode output tokens rather than the concept).",
    )
    n_screen: Count = Field(
        8,
        description="Prompts of each kind used to screen every candidate before the finalists are "
        "scored on the whole validation split.",
    )
    n_finalists: Count = Field(8, description="Candidates re-scored on the whole validation split.")
    layer: Index | None = Field(
        None, description="Skip selection: use the direction of this layer (with --site)."
    )
    direction: PathOption | None = Field(
        None,
        description="Skip activations and selection: apply this saved direction (the "
        "direction.safetensors of an earlier run; its direction.json must sit beside it).",
    )
    site: Site = Field("pre", description="Site used with --layer.")
    strength: FiniteFloat = Field(
        1.0, description="Ablation strength: 1 removes the direction, 0 leaves the model untouched."
    )
    refusal_objective: RefusalObjective = Field(
        "next_token",
        description="What selection and search measure refusal by. 'next_token': the next-token "
        "probability of the first tokens of common refusal openings. 'openings': the probability "
        "that the answer opens with one of the model's own refusal openings (the most frequent "
        "openings of its judged refusals on the harmful validation prompts, teacher-forced over "
        "--opening-tokens tokens; finding them costs one short generation).",
    )
    refusal_openings: Count = Field(
        2,
        description="With --refusal-objective openings: how many of the model's own refusal "
        "openings the objective asks about.",
    )
    opening_tokens: Count = Field(
        4,
        description="Tokens of each refusal opening (teacher-forced after each harmful prompt).",
    )
    edits_per_pass: Count = Field(
        4,
        description="Candidate edits scored together in one forward pass (each on its own rows "
        "of the batch) by selection and search; 1 scores them one at a time.",
    )
    screen_halving: bool = Field(
        False,
        description="Screen candidates by successive halving: after each round on n prompts of "
        "each kind (from --n-screen) only the better half goes on to 2n prompts, until "
        "--n-finalists remain. Off: one round on --n-screen prompts.",
    )
    refine_steps: Annotated[int, Field(ge=0)] = Field(
        0,
        description="Steps of descent on the per-layer attention and MLP strengths of the chosen "
        "edit (lower KL at the same refusal likelihood on validation prompts): of the selected "
        "direction's edit in run, of the chosen trial in --optimize. 0: no refinement (run: the "
        "direction removed at --strength from every writer).",
    )

    @model_validator(mode="after")
    def _one_source_of_direction(self) -> SelectionOptions:
        if self.direction is not None and self.layer is not None:
            raise problem("pass either --direction or --layer, not both.")
        return self


class SearchOptions(Options):
    """How ``--optimize`` searches the edit space (see :mod:`abliterate.search.optimize`)."""

    optimize: bool = Field(
        False,
        description="Search directions, per-layer strength profiles, projection and norm "
        "preservation with multi-objective Optuna (refusals vs. KL on validation prompts) instead "
        "of one full-strength direction.",
    )
    trials: Count = Field(
        64,
        description="Completed search trials to reach (a resumed study counts the trials it "
        "already has).",
    )
    storage: Text | None = Field(
        None,
        description="Optuna storage URL of the study (e.g. sqlite:///study.db, "
        "postgresql://...). Default: sqlite file OUT.study.db beside the run directory, which "
        "survives a killed run.",
    )
    study_name: Text = Field(
        "abliterate",
        description="Study name in the storage; workers sharing --storage and --study-name search "
        "together.",
    )
    refusal_target: FiniteFloat = Field(
        0.05,
        ge=0,
        le=1,
        description="Judged refusal rate on harmful validation prompts that the chosen trial must "
        "reach; the lowest-KL Pareto trial at or below it is chosen.",
    )
    max_confirm: Count = Field(
        6, description="Most Pareto-front trials confirmed by generating and judging answers."
    )
    search_dtype: SearchDType = Field(
        "auto",
        description="Precision the search scores trials in (their forward passes; "
        "confirmation generates with the model itself, and the Pareto-front trials are scored "
        "again in the model's precision before the choice). Selection screens candidates in it "
        "only when it is named (not 'auto'), and scores the finalists in the model's precision. "
        "'auto': bfloat16 when the model is float32 and the device computes bfloat16 natively "
        "(CUDA with bf16, a CPU with AVX512-BF16 or AMX: about 4x faster on the demo model), on "
        "a bfloat16 copy of the model; else the model's own dtype. 'model': never copy. The "
        "final evaluation and the exported model always use the model's dtype.",
    )
    confirm_tokens: Count = Field(
        32,
        description="Tokens generated per harmful validation prompt when confirming a trial's "
        "refusal rate (refusals show in the opening: on the demo model 41 of 42 refusals are "
        "caught within 32 tokens); the final evaluation uses --max-new-tokens.",
    )
    max_directions: Count = Field(
        1,
        description="Let the search remove up to this many directions at once: the mean "
        "difference plus the top singular vectors of the per-prompt differences (each harmful "
        "prompt's activation minus the harmless mean) orthogonal to it. 1: the mean difference "
        "only.",
    )
    trials_per_pass: Count = Field(
        1,
        description="Trials the search asks TPE for together and scores in one forward pass "
        "(pending trials are kept apart by TPE's constant liar): faster, but each trial is "
        "sampled without the results of the others in its group. Capped by --edits-per-pass.",
    )
    mlp_peak_min: FiniteFloat = Field(
        0.2,
        ge=0,
        le=1.5,
        description="Lowest MLP peak strength the search samples (0 lets it leave the MLPs "
        "untouched; some models are damaged most there).",
    )
    trial: Index | None = Field(
        None, description="Skip the automatic choice and use this trial number of the study."
    )

    @model_validator(mode="after")
    def _trial_needs_a_study(self) -> SearchOptions:
        if self.trial is not None and not self.optimize:
            raise problem("--trial picks a trial of an optimization study; add --optimize.")
        return self
