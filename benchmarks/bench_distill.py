"""Does the TST search help? Students distilled on two shipped tasks, paired over seeds, with 95 % intervals.

    python benchmarks/bench_distill.py                          # the README's tables: both tasks, 5 arms, 5 seeds, test
    python benchmarks/bench_distill.py --split validation --epochs 20 40 80 --arms kd    # the convergence curve
    python benchmarks/bench_distill.py --split validation --set magnitude_sampling=relaxed,mean,uniform --arms tst

Protocol (README, "Does the search help?"):
- Tasks: "mnist", few-shot MNIST (1,000 training digits, 1,000 validation digits carved from the rest of the
  training pool, 3,000 test digits); "photos", which shipped photo a 32x32 patch comes from (100 patches a class
  each from the top three quarters of the left halves for training, the bottom quarter for validation, the
  right halves for testing). Settings are chosen on --split validation; --split test is reported once.
- Every arm and every teacher sees the standard augmentation of the paper's baselines: a random crop of the
  image padded by 4 px, and a horizontal flip on the photos (not on digits).
- Paired seeds: the arms of a seed share its teacher (trained once, cached), its splits, its data order and
  its initial student.
- Arms: "student" (cross-entropy alone, no teacher); "kd" (Eq. 1 on cat([x, x])); "fixed" (KD on
  cat([x_hat, x]) with the 14 ops at the initial policy, no search); "randaugment" (the same with kornia's
  RandAugment(n=2, m=10) as x_hat); "tst" (KD with Stage II searching the policy, search_passes passes a
  block); "tst-long" (the same with LONG_SEARCH_STEPS Stage II steps a block); "frozen" (tst-long's final policy
  of the same seed, task, epochs and settings as a fixed policy from epoch 0, no search: is it the search during
  training, or just a better fixed policy?); "pruned" (the initial policy without Invert and Solarize).

Results go to --results (JSON, one record a run, rewritten atomically after each run); a killed run is resumed
by rerunning the same command: finished runs are read back, not rerun. Every run measures its student on both
the validation and the test split (a run chosen on validation is not trained again for the test table); what
is printed is the --split asked for. Runs go in --jobs processes of one thread each.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from diffaug import OPS, PolicyAugmenter
from diffaug.distill import Distiller
from diffaug.distill import default_milestones
from diffaug.distill import train_teacher
from diffaug.distill.data import Splits, small_models, standard_augment, task_splits
from diffaug.files import write_atomic

ARMS = ("student", "kd", "fixed", "randaugment", "tst", "tst-long", "frozen", "pruned")
SEARCHING = ("tst", "tst-long")
DEFAULT_ARMS = ("student", "kd", "fixed", "randaugment", "tst")  # the README's first tables
# Stage II steps a block in "tst-long": the paper's one-pass ablation (Table 6, one CIFAR pass of 391 steps), where
# a 400-step search on MNIST settled (DESIGN.md, 6b).
LONG_SEARCH_STEPS = 400
PRUNED = ("Invert", "Solarize")
TASKS = ("mnist", "photos")
# The settings a study may vary (--set NAME=V1,V2), with their defaults: the library's own, so that the table
# measures what a user gets. search_passes is Stage II's length per block in passes over the training data.
DEFAULTS: dict[str, Any] = {
    "magnitude_sampling": PolicyAugmenter.__init__.__kwdefaults__["magnitude_sampling"],
    "n_ops": 4,
    "search_lr": Distiller.__init__.__kwdefaults__["search_lr"],
    "search_passes": 1,
    "alpha": Distiller.__init__.__kwdefaults__["alpha"],
    "beta": Distiller.__init__.__kwdefaults__["beta"],
}
BATCH, STUDENT_LR = 64, 0.05
# Student epochs, from plain KD's validation curve (README, seed 0): at 80 the last fifth of training moves validation
# accuracy by 0.3 (MNIST) and 0.2 points (photos); at 40 MNIST was still 2.6 points short of 80, the photos 1.7.
EPOCHS = {"mnist": 80, "photos": 80}
PAIRS = (("tst", "kd"), ("tst", "fixed"), ("fixed", "kd"), ("tst", "randaugment"), ("kd", "student"),
         ("tst-long", "fixed"), ("tst-long", "frozen"), ("tst-long", "kd"), ("tst-long", "tst"), ("pruned", "fixed"))
RESULTS = Path(__file__).with_name("results") / "distill.json"
# Two-sided 95 % quantiles of Student's t, by degrees of freedom (no scipy among the dependencies).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}
# One-sided 95 % quantiles (the 90 % two-sided interval of the equivalence test), by degrees of freedom.
T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812,
       11: 1.796, 12: 1.782, 13: 1.771, 14: 1.761, 15: 1.753, 16: 1.746, 17: 1.740, 18: 1.734, 19: 1.729, 20: 1.725}
# The dose experiment's pre-registered equivalence margin, in points of accuracy (README).
EQUIVALENCE_MARGIN = 0.5


class KorniaRandAugment(torch.nn.Module):
    """kornia's RandAugment(n=2, m=10); gray images go through it as three equal channels and come back as their
    mean (its Color op needs RGB)."""

    def __init__(self) -> None:
        super().__init__()
        from kornia.augmentation.auto import RandAugment

        self.randaugment = RandAugment(n=2, m=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            return self.randaugment(x.expand(-1, 3, -1, -1)).mean(1, keepdim=True)
        return self.randaugment(x)


def accuracy(model: torch.nn.Module, dataset: TensorDataset) -> float:
    model.eval()
    x, y = dataset.tensors
    with torch.no_grad():
        return float(sum((model(xb).argmax(1) == yb).sum() for xb, yb in zip(x.split(500), y.split(500))) / len(y))


def teacher_path(cache: Path, task: str, seed: int, epochs: int) -> Path:
    return cache / f"teacher-{task}-seed{seed}-e{epochs}-cropflip.pt"


def train_cached_teacher(task: str, seed: int, epochs: int, cache: Path) -> dict[str, Any]:
    """Train the seed's teacher with the standard augmentation (cosine schedule, to convergence) and cache it."""
    path = teacher_path(cache, task, seed, epochs)
    splits = task_splits(task, seed=seed)
    teacher, _ = small_models(splits.train.tensors[0].shape[1], 10, seed=seed)
    if not path.is_file():
        torch.manual_seed(seed)
        loader = DataLoader(splits.train, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))
        train_teacher(teacher, loader, epochs, "cpu", standard_augment(task), seed=seed)
        write_atomic(path, lambda temporary: torch.save(teacher.state_dict(), temporary))
    teacher.load_state_dict(torch.load(path, weights_only=True))
    return {"task": task, "seed": seed, "epochs": epochs, "validation": accuracy(teacher, splits.validation),
            "test": accuracy(teacher, splits.test)}


def train_student_alone(student: torch.nn.Module, loader: DataLoader, epochs: int, task: str, seed: int,
                        validation: TensorDataset) -> list[float]:
    """Cross-entropy on x alone with the Distiller's optimiser and schedule; validation accuracy per epoch."""
    optimiser = torch.optim.SGD(student.parameters(), lr=STUDENT_LR, momentum=0.9, weight_decay=1e-4, nesterov=True)
    milestones = default_milestones(epochs)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones, 0.1)
    augment, generator = standard_augment(task), torch.Generator().manual_seed(seed)
    curve = []
    for epoch in range(epochs):
        loader.generator.manual_seed(seed * 100003 + epoch)  # the Distiller's data order, so the arms are paired
        student.train()
        for x, y in loader:
            optimiser.zero_grad()
            F.cross_entropy(student(augment(x, generator)), y).backward()
            optimiser.step()
        schedule.step()
        curve.append(accuracy(student, validation))
    return curve


def searched_logits(config: dict[str, Any], results: Path) -> dict[str, list[float]]:
    """The final policy logits of the tst-long run that a frozen run replays (same task, seed, epochs, settings)."""
    searched = {**config, "arm": "tst-long"}
    for r in _load(results)["runs"]:
        if _key(r["config"]) == _key(searched) and "logits" in r["result"]:
            return r["result"]["logits"]
    raise SystemExit(f"a frozen run needs its tst-long run in {results} first; run --arms tst-long for {searched}")


def setup(config: dict[str, Any], cache: Path, results: Path
          ) -> tuple[Splits, DataLoader, torch.nn.Module, Distiller | None]:
    """The seed's splits, data loader and initial student, and the arm's Distiller (None for the student alone)."""
    task, arm, seed, settings = config["task"], config["arm"], config["seed"], config["settings"]
    splits = task_splits(task, seed=seed)
    teacher, student = small_models(splits.train.tensors[0].shape[1], 10, seed=seed)
    loader = DataLoader(splits.train, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))
    if arm == "student":
        return splits, loader, student, None
    teacher.load_state_dict(torch.load(teacher_path(cache, task, seed, config["teacher_epochs"]), weights_only=True))
    if arm == "kd":
        augmenter: torch.nn.Module = torch.nn.Identity()
    elif arm == "randaugment":
        augmenter = KorniaRandAugment()
    else:
        ops = [op for op in OPS if op not in PRUNED] if arm == "pruned" else None
        augmenter = PolicyAugmenter(ops, magnitude_sampling=settings["magnitude_sampling"], n_ops=settings["n_ops"])
        if arm == "frozen":
            logits = searched_logits(config, results)
            with torch.no_grad():
                for name, values in logits.items():
                    getattr(augmenter, name).copy_(torch.tensor(values))
    steps = config.get("search_steps", settings["search_passes"] * len(loader))
    search = {"search_epochs": None if arm in SEARCHING else [], "search_lr": settings["search_lr"],
              "search_steps": steps, "alpha": settings["alpha"],
              "beta": settings["beta"]}
    distiller = Distiller(teacher, student, augmenter, standard_augment=standard_augment(task), lr=STUDENT_LR,
                          seed=seed, progress=False, **search)
    return splits, loader, student, distiller


def run(config: dict[str, Any], cache: Path, results: Path) -> dict[str, Any]:
    """One arm of one seed; returns its final accuracy on the validation and the test split, and the validation
    curve. Both are measured so that a run chosen on validation need not be trained again for its test number;
    the tables and progress lines show only the split asked for."""
    started = time.perf_counter()
    splits, loader, student, distiller = setup(config, cache, results)
    record: dict[str, Any] = {}
    if distiller is None:
        curve = train_student_alone(student, loader, config["epochs"], config["task"], config["seed"], splits.validation)
    else:
        arm = config["arm"]
        history = distiller.fit(loader, config["epochs"], DataLoader(splits.validation, batch_size=500))
        curve = [e["val_accuracy"] for e in history["epochs"]]
        record["teacher_confidence"] = [e["teacher_confidence"] for e in history["epochs"]]
        record["teacher_confidence_clean"] = [e["teacher_confidence_clean"] for e in history["epochs"]]
        if arm in ("frozen", "pruned"):
            record["policy"] = history["epochs"][-1]["policy"]
        if arm in SEARCHING:
            record["policy"] = history["epochs"][-1]["policy"]
            record["search"] = [e["search"] for e in history["epochs"] if "search" in e]
            record["logits"] = {name: getattr(distiller.augmenter, name).tolist()
                                for name in ("probability_logits", "magnitude_logits")}
    record["validation_curve"] = curve
    record["validation"], record["test"] = curve[-1], accuracy(student, splits.test)
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def _key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def _work(job: tuple[str, dict[str, Any], str, str]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    kind, config, cache, results = job
    torch.set_num_threads(1)
    if kind == "teacher":
        return kind, config, train_cached_teacher(config["task"], config["seed"], config["epochs"], Path(cache))
    return kind, config, run(config, Path(cache), Path(results))


def _parse_epochs(values: list[str]) -> dict[str, list[int]]:
    """--epochs 80 or --epochs mnist=80 photos=40 (a bare number is for every task) into epochs by task."""
    epochs: dict[str, list[int]] = defaultdict(list)
    for value in values:
        task, _, number = value.rpartition("=")
        if task not in ("", *TASKS) or not number.isdigit() or int(number) < 1:
            raise SystemExit(f"--epochs takes E or TASK=E with TASK one of {list(TASKS)}; got {value!r}")
        epochs[task or "*"].append(int(number))
    return epochs


def _parse_settings(pairs: list[str]) -> list[dict[str, Any]]:
    """--set NAME=V1,V2 ... into the product of every setting's values, over the defaults."""
    grid: dict[str, list[Any]] = {}
    for pair in pairs:
        name, _, values = pair.partition("=")
        if name not in DEFAULTS or not values:
            raise SystemExit(f"--set must be NAME=V1[,V2...] with NAME one of {sorted(DEFAULTS)}; got {pair!r}")
        kind = type(DEFAULTS[name])
        grid[name] = [kind(v) for v in values.split(",")]
    names = list(grid)
    return [{**DEFAULTS, **dict(zip(names, values))} for values in itertools.product(*(grid[n] for n in names))]


def paired_interval(differences: list[float], quantiles: dict[int, float] = T975) -> tuple[float, float]:
    """Mean of paired differences and the half-width of its t-interval (95 % two-sided by default)."""
    mean = statistics.mean(differences)
    if len(differences) < 2:
        return mean, math.nan
    normal = 1.96 if quantiles is T975 else 1.645
    return mean, quantiles.get(len(differences) - 1, normal) * statistics.stdev(differences) / math.sqrt(len(differences))


def equivalence(differences: list[float], margin: float = EQUIVALENCE_MARGIN) -> str:
    """Two one-sided t-tests at 5 % each: "equivalent" when the 90 % interval lies inside (-margin, +margin)."""
    mean, half = paired_interval(differences, T95)
    if math.isnan(half):
        return "n/a"
    inside = -margin < mean - half and mean + half < margin
    return f"{'equivalent' if inside else 'not shown'} (90 % [{mean - half:+.2f}, {mean + half:+.2f}])"


def policy_movement(policies: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """The largest change of any probability and of any magnitude from the initial 0.5, averaged over runs, and
    the three ops whose values moved most on average."""
    def shift(policy: dict[str, dict[str, float]], key: str) -> dict[str, float]:
        return {op: abs(v[key] - 0.5) for op, v in policy.items() if key in v}

    moved = {key: statistics.mean(max(shift(p, key).values()) for p in policies) for key in ("probability", "magnitude")}
    mean_shift = {op: statistics.mean(max(shift(p, "probability")[op], shift(p, "magnitude").get(op, 0)) for p in policies)
                  for op in policies[0]}
    ranked = sorted(mean_shift, key=mean_shift.get, reverse=True)[:3]  # type: ignore[arg-type]
    # The two learned numbers only: a policy() also states their meaning (distributions, sentences), not averageable.
    final = {op: {k: round(statistics.mean(p[op][k] for p in policies), 2) for k in ("probability", "magnitude")
                  if k in policies[0][op]} for op in ranked}
    return {**moved, "ops": final}


def _load(path: Path) -> dict[str, Any]:
    stored = json.loads(path.read_text()) if path.is_file() else {"runs": [], "teachers": []}
    return {"runs": [_upgrade(r) for r in stored["runs"]], "teachers": stored["teachers"]}


def _store(path: Path, kind: str, config: dict[str, Any], result: dict[str, Any]) -> None:
    """Add one finished run (or teacher) to the results file, replacing an older record of it. The file is read
    again under a lock first, so that two harness commands can share one file (POSIX file locks)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stored = _load(path)
        if kind == "teacher":
            stored["teachers"] = [d for d in stored["teachers"] if {**d, **config} != d] + [result]
        else:
            stored["runs"] = [r for r in stored["runs"] if _key(r["config"]) != _key(config)]
            stored["runs"].append({"config": config, "result": result})
        text = json.dumps(stored, indent=1)
        write_atomic(path, lambda temporary: Path(temporary).write_text(text))


def _upgrade(run: dict[str, Any]) -> dict[str, Any]:
    """A record of the first format (one split measured, named in the config) in the current one."""
    if "split" not in run["config"]:
        return run
    config = {k: v for k, v in run["config"].items() if k != "split"}
    result = {k: v for k, v in run["result"].items() if k != "accuracy"} | {run["config"]["split"]: run["result"]["accuracy"]}
    return {"config": config, "result": result}


def report(runs: list[dict[str, Any]], split: str) -> str:
    """Markdown tables: per group (task, epochs, settings) the arms' mean +- std on ``split`` and the paired
    differences."""
    groups: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    policies: dict[str, dict[str, list[dict[str, dict[str, float]]]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        c = r["config"]
        group = json.dumps({k: c[k] for k in ("task", "epochs")} | {"settings": c["settings"]}, sort_keys=True)
        groups[group][c["arm"]][c["seed"]] = 100 * r["result"][split]
        if c["arm"] in SEARCHING and "policy" in r["result"]:
            policies[group][c["arm"]].append(r["result"]["policy"])
    lines = []
    for group, arms in sorted(groups.items()):
        g = json.loads(group)
        changed = {k: v for k, v in g["settings"].items() if v != DEFAULTS[k]}
        lines += [f"\n{g['task']}, {g['epochs']} epochs, {split} accuracy (%), settings {changed or 'default'}",
                  "| arm | seeds | mean ± std |", "|---|---|---|"]
        for arm in ARMS:
            if arm in arms:
                values = list(arms[arm].values())
                std = statistics.stdev(values) if len(values) > 1 else math.nan
                lines.append(f"| {arm} | {len(values)} | {statistics.mean(values):.2f} ± {std:.2f} |")
        pairs = [(a, b) for a, b in PAIRS if a in arms and b in arms]
        if pairs:
            lines += [f"| paired difference | seeds | mean [95 % interval] | within ±{EQUIVALENCE_MARGIN}? |",
                      "|---|---|---|---|"]
        for a, b in pairs:
            seeds = sorted(set(arms[a]) & set(arms[b]))
            differences = [arms[a][s] - arms[b][s] for s in seeds]
            mean, half = paired_interval(differences)
            lines.append(f"| {a} − {b} | {len(seeds)} | {mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] | "
                         f"{equivalence(differences)} |")
        for arm, searched in policies[group].items():
            moved = policy_movement(searched)
            lines.append(f"\nHow far {arm}'s Stage II moved the policy from p = m = 0.5 (mean over seeds): largest |Δp| "
                         f"{moved['probability']:.3f}, largest |Δm| {moved['magnitude']:.3f}; "
                         f"most moved: {moved['ops']}")
    return "\n".join(lines + _settings_differences(groups))


def _settings_differences(groups: dict[str, dict[str, dict[int, float]]]) -> list[str]:
    """For a study: each arm under changed settings against the same arm, task and epochs under the defaults,
    as paired differences over the seeds both have."""
    lines: list[str] = []
    for group, arms in sorted(groups.items()):
        g = json.loads(group)
        changed = {k: v for k, v in g["settings"].items() if v != DEFAULTS[k]}
        default = groups.get(json.dumps({"task": g["task"], "epochs": g["epochs"], "settings": DEFAULTS}, sort_keys=True))
        if not changed or default is None:
            continue
        for arm, values in arms.items():
            seeds = sorted(set(values) & set(default.get(arm, {})))
            if seeds:
                mean, half = paired_interval([values[s] - default[arm][s] for s in seeds])
                lines.append(f"| {g['task']} | {arm} | {changed} − default | {len(seeds)} | "
                             f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] |")
    if lines:
        lines = ["\nsettings against the defaults, paired over seeds", "| task | arm | settings | seeds | mean [95 % interval] |",
                 "|---|---|---|---|---|", *lines]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(DEFAULT_ARMS))
    parser.add_argument("--long-search-steps", type=int, default=LONG_SEARCH_STEPS,
                        help="Stage II steps a block in the tst-long arm, and so in frozen (default %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", nargs="+", default=[f"{t}={e}" for t, e in EPOCHS.items()], metavar="[TASK=]E",
                        help="student epochs, for every task or per task (default %(default)s: from plain KD's "
                             "validation curve, README)")
    parser.add_argument("--teacher-epochs", type=int, default=60, help="teacher epochs (default %(default)s)")
    parser.add_argument("--split", choices=("validation", "test"), default="test",
                        help="where the final accuracy is measured (default %(default)s; choose settings on validation)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="NAME=V1,V2",
                        help=f"vary a setting (the product of all --set is run); defaults {DEFAULTS}")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file of runs (default %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/teachers"), help="teacher cache (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel processes, one thread each (default %(default)s)")
    args = parser.parse_args(argv)
    epochs = _parse_epochs(args.epochs)
    if args.long_search_steps < 1:
        raise SystemExit(f"--long-search-steps must be a positive number of steps; got {args.long_search_steps}")
    # tst-long and frozen runs name their search length; the other arms' configs keep their first format.
    long = {"search_steps": args.long_search_steps}
    configs = [{"task": t, "arm": a, "seed": s, "epochs": e, "teacher_epochs": args.teacher_epochs, "settings": settings}
               | (long if a in ("tst-long", "frozen") else {})
               for t, s, settings, a in itertools.product(args.tasks, args.seeds, _parse_settings(args.settings), args.arms)
               for e in epochs.get(t, epochs.get("*", []))]
    stored = _load(args.results)
    done = {_key(r["config"]) for r in stored["runs"] if args.split in r["result"]}
    pending = [c for c in configs if _key(c) not in done]
    # A teacher is trained where the cache lacks it (a fresh clone) and recorded once.
    teachers = [{"task": t, "seed": s, "epochs": args.teacher_epochs} for t, s in itertools.product(args.tasks, args.seeds)
                if not teacher_path(args.cache_dir, t, s, args.teacher_epochs).is_file()
                or not any(d == {**d, "task": t, "seed": s, "epochs": args.teacher_epochs} for d in stored["teachers"])]
    print(f"{len(configs) - len(pending)} of {len(configs)} runs already in {args.results}; "
          f"{len(teachers)} teachers and {len(pending)} runs to go", flush=True)
    jobs = [("teacher", c, str(args.cache_dir), str(args.results)) for c in teachers]
    # A frozen run replays its tst-long run's policy, so it waits for the others.
    runs = [("run", c, str(args.cache_dir), str(args.results)) for c in pending if c["arm"] != "frozen"]
    frozen = [("run", c, str(args.cache_dir), str(args.results)) for c in pending if c["arm"] == "frozen"]
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.jobs) as pool:
        for phase in (jobs, runs, frozen):  # teachers first, shared by arms
            for count, (kind, config, result) in enumerate(pool.imap_unordered(_work, phase), 1):
                _store(args.results, kind, config, result)
                if kind == "teacher":
                    line = f"teacher {config['task']} seed {config['seed']}: validation {result['validation']:.4f}"
                else:
                    changed = {k: v for k, v in config["settings"].items() if v != DEFAULTS[k]}
                    line = (f"{config['task']} {config['arm']} seed {config['seed']} {config['epochs']} epochs "
                            f"{changed or ''}: {args.split} {result[args.split]:.4f} [{result['seconds']:.0f} s]")
                print(f"[{count}/{len(phase)}] {line}", flush=True)
    wanted = {_key(c) for c in configs}
    final = _load(args.results)["runs"]  # with what another command sharing the file added meanwhile
    print(report([r for r in final if _key(r["config"]) in wanted and args.split in r["result"]], args.split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
