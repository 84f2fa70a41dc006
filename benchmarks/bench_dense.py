"""Dense tasks: does distilling on policy-augmented views help a segmenter and a localiser? Paired seeds, 95 %
intervals, the protocol of bench_distill.py.

    python benchmarks/bench_dense.py                                  # the README's tables (test split)
    python benchmarks/bench_dense.py --split validation --seeds 0 1 2   # choosing settings

Tasks (``diffaug.distill.dense.digit_scenes``): "segmentation", a shipped MNIST digit pasted on a crop of a
shipped photo, 11 classes per pixel (mean IoU); "localisation", the same kind of scene with the digit's class
and box (mean L1 box error in pixels, lower is better). 1,000 training, 300 validation and 600 test scenes,
disjoint in digits and in photo pixels. Teachers (``dense_models``: 16 / 32 wide) are trained once per seed
with Adam (cosine, 40 epochs) and cached; students are 8 wide, distilled with Adam (x0.1 at the Distiller's
milestones). Adam's rate is 3e-3 for segmentation and 1e-3 for localisation (chosen on validation, seed 0).

Arms: "kd" (Eq. 1 per pixel, or KD + box loss + feature mimic, on cat([x, x])); "fixed" (the same on
cat([x_hat, x]) with the 14 ops at the initial policy, geometry="composed", targets moved with the images);
"tst" (Stage II searching the policy with the task's terms). Every arm of a seed shares its teacher, splits,
data order and initial student.

--search-lr and --search-passes set the tst arm's Stage II (SGD rate, passes per search block); a tst run's config
holds them only where they differ from the defaults (0.01, one pass).

Results go to --results (JSON, rewritten atomically after each run); rerunning the command resumes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from bench_distill import _store, paired_interval  # one results format and one interval for both benchmarks

from diffaug import PolicyAugmenter
from diffaug.distill import Distiller, Localisation, Segmentation, Task
from diffaug.distill.dense import dense_models, digit_scenes
from diffaug.files import write_atomic

ARMS = ("kd", "fixed", "tst")
TASKS = ("segmentation", "localisation")
METRIC = {"segmentation": ("miou", "mean IoU (%)", 100.0), "localisation": ("box_error", "box error (px)", 1.0)}
BATCH = 64
# Adam rates chosen on validation (seed 0): at 3e-3 the localisation teacher traded its box error (3.6 px) for its
# class, at 1e-3 it reached 1.2 px and 75 % accuracy.
LR = {"segmentation": 3e-3, "localisation": 1e-3}
EPOCHS, TEACHER_EPOCHS, SCENES = 30, 40, (1000, 300, 600)
RESULTS = Path(__file__).with_name("results") / "dense.json"
PAIRS = (("tst", "kd"), ("tst", "fixed"), ("fixed", "kd"))
SEARCH_LR, SEARCH_PASSES = Distiller.__init__.__kwdefaults__["search_lr"], 1  # the tst arm's Stage II defaults


def make_task(task: str, teacher: torch.nn.Module, student: torch.nn.Module) -> Task:
    if task == "segmentation":
        return Segmentation()
    return Localisation(student.feature_channels, teacher.feature_channels, image_size=(32, 32))


def evaluate(model: torch.nn.Module, task: Task, dataset: TensorDataset) -> float:
    model.eval()
    total = None
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=300):
            s = task.statistics(model(batch[0]), task.unpack(batch, torch.device("cpu")))
            total = s if total is None else total + s
    return task.metric(total)


def supervised_loss(task: Task, outputs: Any, targets: Any) -> torch.Tensor:
    """The teacher's training loss: Stage II's teacher term (CE, and the box loss for localisation)."""
    return task.search_terms(outputs, outputs, targets)[0]


def teacher_path(cache: Path, config: dict[str, Any]) -> Path:
    scenes = "-".join(map(str, config["scenes"]))
    task = config["task"]
    return cache / f"dense-{task}-seed{config['seed']}-e{config['teacher_epochs']}-lr{LR[task]:g}-n{scenes}.pt"


def train_cached_teacher(config: dict[str, Any], cache: Path) -> dict[str, Any]:
    """Adam with a cosine schedule on the training scenes, cached per seed."""
    task, seed, epochs = config["task"], config["seed"], config["teacher_epochs"]
    splits = digit_scenes(task, seed=seed, sizes=tuple(config["scenes"]))
    teacher, student = dense_models(task, seed=seed)
    objective = make_task(task, teacher, student)
    path = teacher_path(cache, config)
    if not path.is_file():
        torch.manual_seed(seed)
        loader = DataLoader(splits.train, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))
        # Adam: with SGD (lr 0.05, nesterov) the segmenter predicted background alone for 15 epochs.
        optimiser = torch.optim.Adam(teacher.parameters(), lr=LR[task])
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs * len(loader))
        for _ in range(epochs):
            teacher.train()
            for batch in loader:
                loss = supervised_loss(objective, teacher(batch[0]), objective.unpack(batch, torch.device("cpu")))
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
        write_atomic(path, lambda temporary: torch.save(teacher.state_dict(), temporary))
    teacher.load_state_dict(torch.load(path, weights_only=True))
    return {**config, "validation": evaluate(teacher, objective, splits.validation),
            "test": evaluate(teacher, objective, splits.test)}


def run(config: dict[str, Any], cache: Path) -> dict[str, Any]:
    started = time.perf_counter()
    task, arm, seed = config["task"], config["arm"], config["seed"]
    splits = digit_scenes(task, seed=seed, sizes=tuple(config["scenes"]))
    teacher, student = dense_models(task, seed=seed)
    teacher.load_state_dict(torch.load(teacher_path(cache, _teacher_config(config)), weights_only=True))
    objective = make_task(task, teacher, student)
    loader = DataLoader(splits.train, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))
    augmenter = torch.nn.Identity() if arm == "kd" else PolicyAugmenter(geometry="composed")
    # Adam for the students too (the Distiller's milestones scale its rate): with SGD at lr 0.1 a width-8 segmenter
    # still predicted background alone after 20 epochs of KD.
    search = {"search_lr": config.get("search_lr", SEARCH_LR),
              "search_steps": config.get("search_passes", SEARCH_PASSES) * len(loader)}
    distiller = Distiller(teacher, student, augmenter, task=objective, optimiser=lambda p: torch.optim.Adam(p, lr=LR[task]),
                          seed=seed, progress=False, search_epochs=None if arm == "tst" else [], **search)
    name = f"val_{objective.metric_name}"
    history = distiller.fit(loader, config["epochs"], DataLoader(splits.validation, batch_size=300))
    record: dict[str, Any] = {"validation_curve": [e[name] for e in history["epochs"]]}
    record["validation"] = record["validation_curve"][-1]
    record["test"] = distiller.evaluate(DataLoader(splits.test, batch_size=300))
    if arm == "tst":
        record["policy"] = history["epochs"][-1]["policy"]
        record["search"] = [e["search"] for e in history["epochs"] if "search" in e]
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def _teacher_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in ("task", "seed", "teacher_epochs", "scenes")}


def _work(job: tuple[str, dict[str, Any], str]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    kind, config, cache = job
    torch.set_num_threads(1)
    if kind == "teacher":
        return kind, config, train_cached_teacher(config, Path(cache))
    return kind, config, run(config, Path(cache))


def report(runs: list[dict[str, Any]], split: str) -> str:
    lines = []
    for task in TASKS:
        for epochs in sorted({r["config"]["epochs"] for r in runs if r["config"]["task"] == task}):  # one table each
            _, label, scale = METRIC[task]
            arms: dict[str, dict[int, float]] = {a: {} for a in ARMS}
            for r in runs:
                c = r["config"]
                if c["task"] == task and c["epochs"] == epochs:
                    arms[c["arm"]][c["seed"]] = scale * r["result"][split]
            lines += [f"\n{task}, {epochs} epochs, {split} {label}", "| arm | seeds | mean ± std |", "|---|---|---|"]
            for arm, values in arms.items():
                if values:
                    std = statistics.stdev(values.values()) if len(values) > 1 else float("nan")
                    lines.append(f"| {arm} | {len(values)} | {statistics.mean(values.values()):.2f} ± {std:.2f} |")
            lines += ["| paired difference | seeds | mean [95 % interval] |", "|---|---|---|"]
            for a, b in PAIRS:
                seeds = sorted(set(arms[a]) & set(arms[b]))
                if seeds:
                    mean, half = paired_interval([arms[a][s] - arms[b][s] for s in seeds])
                    lines.append(f"| {a} − {b} | {len(seeds)} | {mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="student epochs (default %(default)s)")
    parser.add_argument("--teacher-epochs", type=int, default=TEACHER_EPOCHS, help="teacher epochs (default %(default)s)")
    parser.add_argument("--scenes", type=int, nargs=3, default=list(SCENES), metavar=("TRAIN", "VALIDATION", "TEST"),
                        help="scenes per split, multiples of 10 (default %(default)s)")
    parser.add_argument("--split", choices=("validation", "test"), default="test",
                        help="what the tables show (default %(default)s; choose settings on validation)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file of runs (default %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/teachers"), help="teacher cache (default %(default)s)")
    parser.add_argument("--search-lr", type=float, default=SEARCH_LR,
                        help="Stage II SGD rate of the tst arm (default: the Distiller's, %(default)s)")
    parser.add_argument("--search-passes", type=int, default=SEARCH_PASSES,
                        help="Stage II passes over the data per search block, tst arm (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel processes, one thread each (default %(default)s)")
    args = parser.parse_args(argv)
    # Search settings enter a tst run's config only where they differ from the defaults, so that the runs stored
    # before these options existed keep their identity (and resume).
    search = {k: v for k, v, default in (("search_lr", args.search_lr, SEARCH_LR),
                                         ("search_passes", args.search_passes, SEARCH_PASSES)) if v != default}
    configs = [{"task": t, "arm": a, "seed": s, "epochs": args.epochs, "teacher_epochs": args.teacher_epochs,
                "scenes": args.scenes, **(search if a == "tst" else {})}
               for t, s, a in itertools.product(args.tasks, args.seeds, args.arms)]
    stored = json.loads(args.results.read_text()) if args.results.is_file() else {"runs": [], "teachers": []}
    done = {json.dumps(r["config"], sort_keys=True) for r in stored["runs"]}
    pending = [c for c in configs if json.dumps(c, sort_keys=True) not in done]
    teachers = [c for c in ({"task": t, "seed": s, "teacher_epochs": args.teacher_epochs, "scenes": args.scenes}
                            for t, s in itertools.product(args.tasks, args.seeds))
                if not teacher_path(args.cache_dir, c).is_file() or not any({**d, **c} == d for d in stored["teachers"])]
    print(f"{len(configs) - len(pending)} of {len(configs)} runs already in {args.results}; "
          f"{len(teachers)} teachers and {len(pending)} runs to go", flush=True)
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        phases = ([("teacher", c, str(args.cache_dir)) for c in teachers], [("run", c, str(args.cache_dir)) for c in pending])
        for phase in phases:  # teachers first, shared by the arms
            for count, (kind, config, result) in enumerate(pool.imap_unordered(_work, phase), 1):
                _store(args.results, kind, config, result)
                what = f"teacher {config['task']} seed {config['seed']}" if kind == "teacher" else \
                    f"{config['task']} {config['arm']} seed {config['seed']}"
                print(f"[{count}/{len(phase)}] {what}: {args.split} {result[args.split]:.4f}"
                      + (f" [{result['seconds']:.0f} s]" if "seconds" in result else ""), flush=True)
    wanted = {json.dumps(c, sort_keys=True) for c in configs}
    final = json.loads(args.results.read_text())["runs"]
    print(report([r for r in final if json.dumps(r["config"], sort_keys=True) in wanted], args.split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
