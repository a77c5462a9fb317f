"""Every command shown in README.md and docs/*.md runs, exactly as written, on this kind of machine.

The commands are read from the documents themselves (tests/documented_commands.py), so a command
added to a document without an entry in `SPECS` below fails `test_every_documented_command_has_a_spec`
until someone decides how it is checked here. Each document's commands run in the order shown, in
one sandbox: a copy of the repository (tracked and untracked-but-not-ignored files), installed
editable into its own virtual environment (``--system-site-packages``, so nothing is downloaded
but the build backend), with a home directory holding ``~/photos`` and ``~/cifar10`` (generated
images) for the documents' ``data-prep images`` examples. The real checkout and its environment
are never touched.

To keep the suite short, a spec may *append* arguments to the command: later ``key=value``
overrides and later options win (every `launch`/`data-prep` subcommand takes options and
overrides in any order, issue 12), so ``train.max_steps=2`` after the documented line trains two
steps of exactly the documented job. Nothing is removed or rewritten from what the document shows.
Commands that cannot do their work on a CPU machine (the GPU benchmarks, a 256×256 job on the
1-CPU test cluster) are run too, and must fail the way the documents promise: fast, one line,
nothing submitted.

Running every document takes minutes: that is the full tier. The quick tier runs README.md's
commands for real, and checks every command of every document in this process, in seconds
(`test_every_documented_command_is_valid`): its arguments parse, its config and overrides load and
validate, `launch local`'s preflight passes (shards, readers, strategy, the model built on the meta
device) and `launch slurm` renders its sbatch script; a script's own argument parser accepts what
the document gives it, and a shell script exists and parses.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.documented_commands import DOCUMENTS, Command, all_commands, commands_in

REPO = Path(__file__).resolve().parent.parent
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"

# Appended to training commands: two steps of the documented job, a checkpoint at the end, a
# 4-image grid, no W&B (offline runs are tested elsewhere); every other setting as documented.
TRAIN = ("train.max_steps=2 train.log_every_steps=1 checkpoint.every_steps=2 sample.every_steps=0 "
         "sample.n=4 eval.every_steps=0 eval.max_images=8 wandb.mode=disabled data.num_workers=0")
# The 256×256 and CIFAR-10 networks, shrunk so that two CPU steps take seconds.
SMALL_UNET = "model.base_channels=32 data.batch_size=2 sample.options.steps=2"
SAMPLE = "--n 4 steps=2"  # a 4-image grid, 2 sampling steps (last option and override win)
CALIBRATION = "train.max_steps=2 checkpoint.every_steps=2 data.num_workers=0"  # benchmarks/calibration.py


@dataclass(frozen=True)
class Spec:
    append: str = ""
    """Arguments appended to the documented line (later ones win)."""
    returncode: int = 0
    expect: str | None = None
    """A regular expression the command's output must contain."""
    before: str | None = None
    """A shell line run first (a prerequisite the document states in words)."""
    skip: str | None = None
    """Why the command is not run here: only for the test suite itself."""
    slurm: bool = False
    timeout: int = 600
    env: dict = field(default_factory=dict)


ONE_LINE_REFUSAL = r"launch: error: [^\n]*nothing submitted"

SPECS: dict[str, Spec] = {
    # README.md
    "scripts/quickstart.sh": Spec(append=TRAIN, expect=r"quickstart: samples in runs/tiny_ddpm/grid.png"),
    "scripts/test.sh": Spec(skip="the test suite itself (CI runs it: .ci/run)"),
    "time scripts/test.sh": Spec(skip="the test suite itself, timed (docs/benchmarks.md)"),
    "time scripts/test.sh --full": Spec(skip="the test suite itself, timed (docs/benchmarks.md)"),
    "data-prep digits data/digits": Spec(),
    # Shards of 8 photographs, so that docs/deepspeed.md's 8 processes each read their own.
    "data-prep images ~/photos data/photos --size 256 --holdout 0.01": Spec(append="--samples-per-shard 8"),
    # 100 images here, not CIFAR-10's 60,000: small shards, so that each of 2 processes has one.
    "data-prep images ~/cifar10 data/cifar10 --size 32 --holdout 0.02": Spec(append="--samples-per-shard 8"),
    "data-prep verify data/photos": Spec(expect="ok"),
    "data-prep reshard data/digits/train data/digits16 --size 16 --mode L": Spec(),
    "launch local configs/tiny/ddpm.yaml": Spec(append=TRAIN),
    "launch local configs/ddpm_cifar32.yaml --nproc 2 train.lr=1e-4 run_dir=runs/x": Spec(append=f"{TRAIN} {SMALL_UNET}"),
    "launch sample runs/x --n 64 --out grid.png --seed 0": Spec(append=SAMPLE),
    "launch sample runs/x sampler=ddim steps=50 --out ddim.png": Spec(append=SAMPLE),
    "launch local configs/tiny/cond_ddpm.yaml": Spec(append=TRAIN),
    "launch sample runs/tiny_cond_ddpm --classes 0,1,2 --n 8 --out classes.png guidance=3": Spec(append="--n 2 steps=2"),
    # docs/benchmarks.md
    "python benchmarks/checkpoint_io.py configs/ddpm_cifar32.yaml --repeats 4": Spec(append="--repeats 1"),
    "python benchmarks/checkpoint_io.py configs/ddpm_cifar32.yaml --repeats 5": Spec(append="--repeats 1"),
    "rm -rf data/digits runs/tiny_ddpm; time scripts/quickstart.sh": Spec(append=TRAIN),
    "OMP_NUM_THREADS=1 python benchmarks/loader.py --images 2000 --workers 0,1,2 --batch 32":
        Spec(append="--images 64 --workers 0,1 --measure-images 64 --impl ours"),
    "OMP_NUM_THREADS=1 python benchmarks/loader.py --images 2000 --workers 0,1,2 --batch 32 --measure-images 4096":
        Spec(append="--images 64 --workers 0 --measure-images 64 --impl ours"),
    "OMP_NUM_THREADS=1 python benchmarks/loader.py --images 2000 --workers 0,1 --batch 32 --measure-images 4096":
        Spec(append="--images 64 --workers 0 --measure-images 64 --impl ours"),
    "OMP_NUM_THREADS=1 python benchmarks/loader.py --images 2000 --workers 0,1 --batch 32 --measure-images 4096 "
    "--stored-size 512": Spec(append="--images 64 --workers 0 --measure-images 64 --impl ours"),
    "python -m venv /tmp/i2d && /tmp/i2d/bin/pip install img2dataset": Spec(timeout=900),
    "OMP_NUM_THREADS=1 python benchmarks/prep_throughput.py --images 2000 --img2dataset /tmp/i2d/bin/img2dataset":
        Spec(append="--images 16 --samples-per-shard 8"),
    # the 337M-parameter model needs ~40 GB over its six jobs: the same benchmark on the tiny DDPM
    "python benchmarks/sharding_memory.py --strategies zero3,fsdp --out docs/benchmarks/sharding_memory_cpu.jsonl":
        Spec(append="--tiny --nprocs 2", expect='"strategy": "fsdp", "nproc": 2'),
    "python benchmarks/sharding_memory.py --strategies fsdp --nprocs 2":
        Spec(append="--tiny", expect='"strategy": "fsdp", "nproc": 2, .*"max_stall_s"'),
    "python benchmarks/sharding_memory.py --strategies fsdp --nprocs 2 checkpoint.async_save=true":
        Spec(append="--tiny", expect='"strategy": "fsdp", "nproc": 2, .*"max_stall_s"'),
    "python benchmarks/zero3_gathered.py": Spec(
        append="--nprocs 2 --steps 2",
        expect=(r'"variant": "sized", "nproc": 2, [^\n]*"steady_peak_vs_model": 0\.5\d*\}\n\{[^\n]*'
                r'"variant": "deepspeed-defaults", "nproc": 2, [^\n]*"steady_peak_vs_model": 1\.0\}')),
    "benchmarks/gpu/run.sh check": Spec(returncode=2, expect="run.sh: no NVIDIA GPU here"),
    "benchmarks/gpu/run.sh train-cifar32": Spec(returncode=2, expect="run.sh: no NVIDIA GPU here"),
    "benchmarks/gpu/run.sh train-256": Spec(returncode=2, expect="run.sh: no NVIDIA GPU here"),
    # docs/data.md
    "data-prep reshard data/digits/train data/digits16 --size 16 --mode L --holdout 0.1": Spec(before="rm -rf data/digits16"),
    "data-prep verify data/digits16": Spec(expect="ok"),
    # docs/deepspeed.md: eight processes of the 256×256 job, its network shrunk
    "launch local --nproc 8 configs/ddpm_256.yaml distributed.strategy=deepspeed "
    "deepspeed.config_file=configs/deepspeed/zero2.json":
        Spec(append=f"{TRAIN} {SMALL_UNET} data.image_size=64 data.batch_size=1",
             before="[ -d data/photos ] || data-prep images ~/photos data/photos --size 256 --holdout 0.01 "
                    "--samples-per-shard 8"),
    "launch export runs/ddpm_256 --out ddpm_256.safetensors": Spec(),
    "launch sample ddpm_256.safetensors sampler=ddim steps=50 --n 16 --out grid.png": Spec(append=SAMPLE),
    # docs/families.md
    "launch local configs/tiny/vae.yaml": Spec(append=TRAIN),
    "launch eval runs/tiny_vae": Spec(append="--max-images 8", expect='"bits_per_dim"'),
    "launch eval runs/tiny_vae --iwae-samples 16 --max-images 128": Spec(append="--max-images 8"),
    "launch eval runs/tiny_pixelcnn --nproc 2":
        Spec(append="--max-images 4", before=f"launch local configs/tiny/pixelcnn.yaml {TRAIN} sample.at_end=false"),
    "launch eval runs/tiny_ddpm --estimator exact --max-images 16":
        Spec(append="--max-images 1",  # T = 20, so that the exact sum is 20 terms
             before=f"rm -rf runs/tiny_ddpm && launch local configs/tiny/ddpm.yaml {TRAIN} model.timesteps=20 "
                    "model.sample_steps=10"),
    "launch sample runs/tiny_flow temperature=0.7 --n 64 --out flow.png":
        Spec(append="--n 4", before=f"launch local configs/tiny/flow.yaml {TRAIN}"),
    "launch sample runs/tiny_ddpm sampler=ddim steps=50 --n 64 --out ddpm.png": Spec(append=SAMPLE),
    "OMP_NUM_THREADS=1 launch local configs/tiny/ddpm.yaml run_dir=runs/dq/tiny_ddpm wandb.mode=disabled":
        Spec(append=TRAIN),
    "OMP_NUM_THREADS=1 launch eval runs/dq/tiny_ddpm --sample-quality 1000 --max-images 2 --batch-size 250":
        Spec(append="--sample-quality 8"),
    "python -m pipeline.digits_quality data/digits": Spec(expect="held-out"),
    "OMP_NUM_THREADS=2 launch local configs/tiny/ddpm.yaml run_dir=runs/bound train.max_steps=200 wandb.mode=disabled "
    "data.image_size=32 model.base_channels=16 model.channel_mult=[1,2,2] model.attention_resolutions=[8] "
    "train.ema_halflife_images=4000 model.ddim_eta=0": Spec(append=TRAIN),
    # docs/conditional.md: each run trained 2 steps, measured on one image per class at one scale
    "time OMP_NUM_THREADS=1 launch local configs/tiny/cond_ddpm.yaml wandb.mode=disabled": Spec(append=TRAIN),
    "time OMP_NUM_THREADS=1 launch local configs/tiny/vpred.yaml wandb.mode=disabled": Spec(append=TRAIN),
    "time OMP_NUM_THREADS=1 launch local configs/tiny/flow_matching.yaml wandb.mode=disabled": Spec(append=TRAIN),
    "time OMP_NUM_THREADS=1 launch local configs/tiny/dit.yaml wandb.mode=disabled": Spec(append=TRAIN),
    "OMP_NUM_THREADS=1 python benchmarks/class_accuracy.py runs/tiny_cond_ddpm --scales 0,1,2,3,5":
        Spec(append="--per-class 1 --scales 1"),
    "OMP_NUM_THREADS=1 python benchmarks/class_accuracy.py runs/tiny_cond_ddpm eta=0 --scales 0,1,2,3,5":
        Spec(append="--per-class 1 --scales 1"),
    "OMP_NUM_THREADS=1 python benchmarks/class_accuracy.py runs/tiny_vpred --scales 0,1,2,3,5":
        Spec(append="--per-class 1 --scales 1"),
    "OMP_NUM_THREADS=1 python benchmarks/class_accuracy.py runs/tiny_vpred eta=1 --scales 1,3":
        Spec(append="--per-class 1 --scales 1"),
    "OMP_NUM_THREADS=1 python benchmarks/class_accuracy.py runs/tiny_flow_matching --scales 0,1,2,3,5":
        Spec(append="--per-class 1 --scales 1"),
    "OMP_NUM_THREADS=1 python benchmarks/class_accuracy.py runs/tiny_dit --scales 0,1,2,3,5":
        Spec(append="--per-class 1 --scales 1"),
    "OMP_NUM_THREADS=1 launch eval runs/tiny_cond_ddpm --sample-quality 64 --no-progress":
        Spec(append="--sample-quality 8 --max-images 8"),
    "OMP_NUM_THREADS=1 launch eval runs/tiny_vpred --sample-quality 64 --no-progress":
        Spec(append="--sample-quality 8 --max-images 8"),
    "OMP_NUM_THREADS=1 launch eval runs/tiny_flow_matching --sample-quality 64 --no-progress":
        Spec(append="--sample-quality 8 --max-images 8"),
    "OMP_NUM_THREADS=1 launch eval runs/tiny_dit --sample-quality 64 --no-progress":
        Spec(append="--sample-quality 8 --max-images 8"),
    # docs/latent.md
    "launch local configs/latent/tiny_autoencoder.yaml": Spec(append=TRAIN),
    "launch eval runs/tiny_autoencoder": Spec(append="--max-images 8", expect='"psnr"'),
    "data-prep latents runs/tiny_autoencoder data/digits data/digits_latents --workers 2": Spec(),
    "launch local configs/latent/tiny_ldm.yaml": Spec(append=TRAIN),
    "launch sample runs/tiny_ldm --classes 0,1,2 --n 8 --out ldm.png": Spec(append="--n 2 steps=2"),
    "launch eval runs/tiny_ldm --sample-quality 64": Spec(append="--sample-quality 8 --max-images 4"),
    "OMP_NUM_THREADS=1 python benchmarks/latent_cost.py flops configs/ldm_256.yaml configs/ddpm_256.yaml "
    "configs/latent/autoencoder_f8_256.yaml": Spec(),
    "OMP_NUM_THREADS=1 python benchmarks/latent_cost.py loader --images 512 --workers 0,1":
        Spec(append="--images 32 --workers 0 --measure-images 32"),
    # docs/monitoring.md
    "launch local configs/tiny/ddpm.yaml run_dir=runs/tiny_status model.timesteps=200 eval.every_steps=60 "
    "eval.max_images=8 sample.n=36 wandb.mode=disabled": Spec(append=f"{TRAIN} eval.every_steps=2 eval.max_images=2"),
    "launch status runs/tiny_status --plot docs/status_tiny.png": Spec(expect="step"),
    # The calibration benchmark writes its 16×16 data here (~40 CPU s), then trains one family
    # for 2 steps and evaluates it; the diffusion half with a 4-channel network and a 2-image floor.
    "python benchmarks/calibration.py --families pixelcnn,vae --oracle-images 0":
        Spec(append=f"--families vae --runs runs/calibration_a --out runs/calibration_a.jsonl {CALIBRATION}",
             expect=r"\| vae \| 2 \|"),
    "python benchmarks/calibration.py --families flow,diffusion --oracle-images 128":
        Spec(append=f"--families diffusion --oracle-images 2 --runs runs/calibration_b --out runs/calibration_b.jsonl "
                    f"{CALIBRATION} model.base_channels=4 model.norm_groups=2",
             expect=r"diffusion floor \(Bayes-optimal ε, T = 4000\)"),
    # docs/slurm.md, on the test cluster (two 1-CPU nodes, no GPUs): the 256×256 job cannot be
    # placed there, and says so in one line without submitting; --dry-run prints its script.
    "launch slurm configs/ddpm_256.yaml": Spec(slurm=True, returncode=2, expect=ONE_LINE_REFUSAL),
    "launch slurm configs/ddpm_256.yaml slurm.nodes=2 --wait": Spec(slurm=True, returncode=2, expect=ONE_LINE_REFUSAL),
    "launch slurm configs/ddpm_256.yaml --dry-run": Spec(slurm=True, expect="#SBATCH"),
    # (docs/deepspeed.md's run, in this sandbox, wrote runs/ddpm_256: here no job was submitted)
    "launch status runs/ddpm_256": Spec(slurm=True, returncode=2, expect=r"launch: error: runs/ddpm_256",
                                        before="rm -rf runs/ddpm_256"),
    "launch cancel runs/ddpm_256": Spec(slurm=True, returncode=2, expect=r"launch: error: runs/ddpm_256"),
    "launch slurm configs/tiny/ddpm.yaml slurm.nodes=2": Spec(slurm=True, returncode=2),
    "launch slurm configs/tiny/ddpm.yaml slurm.nodes=2 slurm.cpus_per_task=1 slurm.partition=gpu":
        Spec(slurm=True, returncode=2),
    # (runs/slurm_tiny, not the quickstart's runs/tiny_ddpm: a 1-process run cannot resume on 2)
    "launch slurm configs/tiny/ddpm.yaml slurm.nodes=2 data.num_workers=0 run_dir=runs/slurm_tiny --no-partition-check "
    "--wait":
        Spec(slurm=True, returncode=2),
    "launch slurm configs/tiny/ddpm.yaml slurm.nodes=2 slurm.cpus_per_task=1 data.num_workers=0 run_dir=runs/slurm_tiny "
    "'slurm.extra_sbatch={hold: true}'": Spec(slurm=True),
    "launch status runs/slurm_tiny": Spec(slurm=True, expect="JobHeldUser"),
    "launch cancel runs/slurm_tiny": Spec(slurm=True),
    "scripts/slurm_cluster.sh start": Spec(slurm=True),
    "launch slurm configs/tiny/ddpm.yaml slurm.nodes=2 slurm.cpus_per_task=1 data.num_workers=0 run_dir=runs/slurm_tiny "
    "--wait": Spec(slurm=True, append=TRAIN),
    "python -m pytest tests/test_slurm.py -m slurm -s": Spec(skip="part of the test suite itself"),
}


def spec_of(command: Command) -> Spec | None:
    return SPECS.get(command.text)


def test_every_documented_command_has_a_spec():
    missing = [f"{c.document}:{c.line}: {c.text}" for c in all_commands() if spec_of(c) is None]
    assert not missing, ("documented commands with no entry in SPECS (decide how each is run here; a "
                         "synopsis that is not meant to run goes in a ```text block):\n" + "\n".join(missing))


def test_skips_are_only_for_the_suite_itself():
    assert {text for text, spec in SPECS.items() if spec.skip} == {
        "scripts/test.sh", "time scripts/test.sh", "time scripts/test.sh --full",
        "python -m pytest tests/test_slurm.py -m slurm -s"}


def test_no_spec_is_left_over():
    shown = {c.text for c in all_commands()}
    assert not [text for text in SPECS if text not in shown]


# ---------------------------------------------------------------------------------------------
# The sandbox


def _images(directory: Path, count: int, size: tuple[int, int] | None, seed: int) -> None:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        width, height = size or (int(rng.integers(64, 320)), int(rng.integers(64, 320)))
        y, x = np.mgrid[0:height, 0:width]
        colour = rng.uniform(0, 255, 3)
        pixels = (colour * (0.5 + 0.5 * np.sin(x / rng.uniform(4, 30))[..., None]
                            * np.cos(y / rng.uniform(4, 30))[..., None])).clip(0, 255).astype(np.uint8)
        suffix = ".jpg" if index % 2 else ".png"
        Image.fromarray(pixels).save(directory / f"img{index:03d}{suffix}")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("documented")
    repo, home = root / "repo", root / "home"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    # The documents' 1-2 % holdouts (a stable hash of each name) keep 2 of these 300 photographs
    # and 1 of these 100 CIFAR-sized images for the test split.
    _images(home / "photos", 300, None, seed=0)
    _images(home / "cifar10", 100, (32, 32), seed=1)
    venv = root / "env"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--no-deps", "-e", str(repo)], check=True)
    env = {**os.environ, "HOME": str(home), "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    env.pop("GENPIPE_FAULTS", None)
    return repo, env


def _normalised(text: str) -> str:
    return re.sub(r"\d+", "N", text.strip())


def _run(command: Command, spec: Spec, repo: Path, env: dict) -> None:
    where = f"{command.document}:{command.line}: {command.text}"
    if spec.before:
        done = subprocess.run(["bash", "-c", spec.before], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=spec.timeout)
        assert done.returncode == 0, f"{where}\nprerequisite `{spec.before}` failed:\n{done.stdout}{done.stderr}"
    line = f"{command.text} {spec.append}".strip()
    try:
        done = subprocess.run(["bash", "-c", line], cwd=repo, env={**env, **spec.env}, capture_output=True,
                              text=True, timeout=spec.timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{where}\nstill running after {spec.timeout}s: {line}\n{exc.stdout or ''}{exc.stderr or ''}")
    output = done.stdout + done.stderr
    tail = "\n".join(output.splitlines()[-30:])
    assert done.returncode == spec.returncode, (
        f"{where}\nran: {line}\nexit status {done.returncode}, expected {spec.returncode}\n{tail}")
    if spec.expect:
        assert re.search(spec.expect, output), f"{where}\nran: {line}\nno match for {spec.expect!r} in:\n{tail}"
    if spec.returncode:
        # One line says what is wrong, last, and no traceback.
        assert done.stderr.strip() and "Traceback" not in output, f"{where}\nnot a one-line error:\n{tail}"
    # What the document shows as this command's own error line is what it prints (numbers aside).
    for shown in command.output:
        if shown.startswith("launch: error:"):
            assert _normalised(shown) in {_normalised(text) for text in output.splitlines()}, (
                f"{where}\nthe document shows\n  {shown}\nbut it printed\n{tail}")


def _cluster_up() -> bool:
    return subprocess.run([str(CLUSTER_SCRIPT), "status"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("document", [
    pytest.param(document, marks=[pytest.mark.quick] if document == "README.md" else
                 [pytest.mark.slurm] if any(SPECS[c.text].slurm for c in commands_in(document) if c.text in SPECS) else [])
    for document in DOCUMENTS])
def test_documented_commands_run_as_written(document, sandbox):
    repo, env = sandbox
    commands = commands_in(document)
    if not commands:
        pytest.skip(f"{document} shows no commands")
    specs = [(command, spec_of(command)) for command in commands]
    assert all(spec is not None for _, spec in specs), "see test_every_documented_command_has_a_spec"
    if any(spec.slurm for _, spec in specs) and not _cluster_up():
        if os.environ.get("CI"):
            pytest.fail("the test Slurm cluster is not up (scripts/slurm_cluster.sh start)")
        pytest.skip("the test Slurm cluster is not up (scripts/slurm_cluster.sh start)")
    if not (repo / "data" / "digits" / "train" / "manifest.json").exists():
        subprocess.run(["data-prep", "digits", "data/digits"], cwd=repo, env=env, check=True, capture_output=True)
    for command, spec in specs:
        if spec.skip:
            continue
        _run(command, spec, repo, env)


# ---------------------------------------------------------------------------------------------
# Every command checked in this process (the quick tier): arguments, configs, preflight


class _Parsed(Exception):
    """Raised in place of running a script once its argument parser has accepted the arguments."""


def _parse_only(main, argv: list[str], where: str) -> None:
    """Run ``main(argv)`` as far as its argparse parser, and no further."""
    import argparse

    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    try:
        argparse.ArgumentParser.parse_args = parse_args
        main(argv)
    except _Parsed:
        return
    except SystemExit as exc:
        pytest.fail(f"{where}: the arguments are refused (exit {exc.code})")
    finally:
        argparse.ArgumentParser.parse_args = original
    pytest.fail(f"{where}: the script ran without parsing arguments")


def _script_main(path: Path):
    """``main`` of a Python script of the repository (benchmarks/*.py), imported from its file."""
    import importlib.util

    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # its sibling modules, as when run as a script
    spec = importlib.util.spec_from_file_location(f"documented_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _simple_commands(text: str) -> list[list[str]]:
    """The simple commands of a line (split at ;, && and ||), environment assignments and ``time``
    removed from each."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, words = [], []
    for token in [*lexer, ";"]:
        if set(token) <= set(";&|"):
            while words and (re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]) or words[0] == "time"):
                words = words[1:]
            if words:
                commands.append(words)
            words = []
        else:
            words.append(token)
    return commands


@pytest.fixture(scope="module")
def static_sandbox(digits_dir, tmp_path_factory) -> Path:
    """A working directory where the documents' relative paths resolve: the repository's configs,
    the session's digits as data/digits, and small stand-ins for the other data sets the
    documents prepare (photos at 256, CIFAR-sized images at 32, digits at 16), with as many
    shards as the documented process and worker counts read."""
    from conftest import make_id_shards

    root = tmp_path_factory.mktemp("documented_static")
    (root / "configs").symlink_to(REPO / "configs")
    (root / "data").mkdir()
    (root / "data" / "digits").symlink_to(digits_dir)
    for name, size, channels, shards in (("photos", 256, 3, 64), ("cifar10", 32, 3, 16), ("digits16", 16, 1, 16)):
        for split in ("train", "test"):
            make_id_shards(root / "data" / name / split, num_shards=shards, per_shard=1, size=size,
                           channels=channels, split=split)
    return root


def _check_launch(argv: list[str], where: str, root: Path) -> None:
    from launch.cli import build_parser
    from launch.local import preflight
    from launch.sample import parse_options
    from launch.slurm import resolve_config, sbatch_script
    from pipeline import config as config_module

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: launch refuses its arguments (exit {exc.code})")
    if args.command == "local":
        config = config_module.load(args.config, args.overrides)
        if (root / config.data.shards).exists():  # data a document makes from a trained run: config only
            preflight(config, args.nproc)
    elif args.command == "slurm":
        assert "#SBATCH" in sbatch_script(resolve_config(args.config, list(args.overrides))), where
    elif args.command == "sample":
        parse_options(args.options)


def _check(command: Command, root: Path) -> None:
    from data_prep.cli import build_parser as data_prep_parser

    where = f"{command.document}:{command.line}: {command.text}"
    for words in _simple_commands(command.text):
        program, argv = words[0], words[1:]
        if program == "launch":
            _check_launch(argv, where, root)
        elif program == "data-prep":
            try:
                data_prep_parser().parse_args(argv)
            except SystemExit as exc:
                pytest.fail(f"{where}: data-prep refuses its arguments (exit {exc.code})")
        elif program in ("python", "python3") and argv[:1] == ["-m"]:
            if argv[1] not in ("venv", "pytest"):  # other programs' own modules
                import importlib

                _parse_only(importlib.import_module(argv[1]).main, argv[2:], where)
        elif program in ("python", "python3"):
            _parse_only(_script_main(REPO / argv[0]), argv[1:], where)
        elif program.startswith(("scripts/", "benchmarks/")):
            script = REPO / program
            assert script.is_file() and os.access(script, os.X_OK), f"{where}: {program} is not an executable file"
            syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
            assert syntax.returncode == 0, f"{where}: {syntax.stderr}"


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_documented_command_is_valid(document, static_sandbox, monkeypatch):
    monkeypatch.chdir(static_sandbox)
    commands = commands_in(document)
    assert all(spec_of(command) is not None for command in commands), "see test_every_documented_command_has_a_spec"
    for command in commands:
        _check(command, static_sandbox)
