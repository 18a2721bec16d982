"""The names kd-mlflow writes into MLflow: the contract between the runs it logs
and the steps that read them back (``compare``, ``ensemble``, ``distill``).

Identity lives here, in tags and params, never in file or folder names.
No torch, no MLflow: both the writers and the readers import this module.
"""

# --- tags (strings) -------------------------------------------------------
ROLE = "kd.role"  # one of ROLES
METHOD = "kd.method"  # students only: "sd" (one teacher of its own architecture) or "kd"
PRESET = "kd.preset"  # the preset the recipe started from
DATASET = "kd.dataset"  # cifar10 | cifar100 | folder | digits
SPLIT_DIGEST = "kd.split_digest"  # sha256 of the train/val split (same split <=> same digest)
NUM_CLASSES = "kd.num_classes"
SEED = "kd.seed"  # model seed (train and student runs)
CONFIG_HASH = "kd.config_hash"  # digest of everything that determines the result
GROUP = "kd.group"  # the same digest less the seed: runs that may be averaged
GROUP_LABEL = "kd.group_label"  # that group in words: the preset and what differs from it
TEACHER_RUN_ID = "kd.teacher_run_id"
TEACHER_ROLE = "kd.teacher_role"  # train | ensemble | student
TEACHER_SEEDS = "kd.teacher_seeds"  # comma-separated model seeds behind the teacher
TEACHER_MODEL = "kd.teacher_model"  # the teacher's architecture(s): "resnet56"; an ensemble's
# distinct ones joined by "+" ("resnet20+resnet8"); a width not published: "resnet20@w16"
GENERATION = "kd.generation"  # 1 = student of a trained model or ensemble, 2 = student of a student, ...
MEMBER_RUN_IDS = "kd.member_run_ids"  # ensembles: comma-separated run ids, in member order
MEMBER_SEEDS = "kd.member_seeds"  # ensembles and joint runs: comma-separated seeds, in member order
MEMBER_ROLE = "kd.member_role"  # ensembles: role of the members (train | student)
PREDICTIONS = "kd.predictions"  # the artifact path of the run's predicted probabilities
PREDICTIONS_PATH = "predictions/predictions.npz"
DUPLICATE_OF = "kd.duplicate_of"  # a run that only points at an existing FINISHED result
PACKED = "kd.packed"  # trained in a packed wave of this many networks (not identity)
FAILURE = "kd.failure"  # why a run ended FAILED, in one line
SWEEP = "kd.sweep"  # a sweep's parent run: "true"
SEARCH = "kd.search"  # a sweep's parent run: grid | optuna
SWEEP_KD_CHOICE = "kd.sweep_kd_choice"  # a study's parent and its KD student: the setting a
# sweep chose on validation ("temperature=2, alpha=1 chosen on validation over 6 settings")
STUDY = "kd.study"  # a study's parent run: "true"
SUMMARY_RUN_IDS = "kd.summary_run_ids"  # a study's parent: the runs its summary metrics are of
COMPARE = "kd.compare"  # a run that only holds compare's tables: "true"
MIXED = "kd.mixed"  # an ensemble of members of different groups (--allow-mixed): "true"
STUDY_RUN_ID = "kd.study_run_id"  # registered model versions: the study that made them
EXPERIMENT_ID = "kd.experiment_id"  # registered model versions: the experiment of that study
VERSION = "kd.version"  # the installed distribution's version (pyproject.toml)
GIT_COMMIT = "kd.git_commit"  # only when the package folder sits at its repository's top level
GIT_DIRTY = "kd.git_dirty"  # "true" | "false": uncommitted changes under the package folder
SOURCE_DIGEST = "kd.source_digest"  # sha256 (16 hex) of kd_mlflow/*.py: the code that ran
# What the numbers depend on beyond the recipe (not identity):
DEVICE = "kd.device"  # the torch device the run trained or evaluated on
PRECISION_RESOLVED = "kd.precision_resolved"  # fp32 | bf16, what precision=auto became
THREADS = "kd.threads"  # torch's CPU thread count
ENV_PREFIX = "kd.env."  # the machine and libraries: kd_mlflow.machine.env_tags

# --- params ---------------------------------------------------------------
# A value that `mlflow run` had logged in another form or value than the one the run
# used: MLflow params are immutable, so the used one is logged as "resolved.<name>".
RESOLVED_PREFIX = "resolved."

# joint: K networks of the train recipe trained as one model whose logits are the mean
# of theirs (issue 21's "training the average directly"); it logs member_{k}_val_acc /
# member_{k}_test_acc, each member alone, k in member order.
JOINT = "joint"
ROLES = ("train", "ensemble", "student", JOINT)

# --- metrics (floats; accuracies in percent, as the report prints them) ----
# Per epoch, step = epoch (1-based):
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_acc")
# Once, for the selected (best-validation) checkpoint, or for an ensemble:
FINAL_VAL_ACC = "final_val_acc"
FINAL_TEST_ACC = "final_test_acc"
BEST_EPOCH = "best_epoch"
# Calibration on the test images, from the probabilities the predictions artifact holds
# (kd_mlflow.calibration); logged at the end by every run, by compare on older runs.
CALIBRATION_METRICS = ("test_nll", "test_ece", "test_brier")


# --- run names: built here only ----------------------------------------------


def seed_label(seeds) -> str:
    """0,1,2,3,4 -> "0-4"; other lists joined with "_"."""
    seeds = [str(s) for s in seeds]
    try:
        ints = sorted(int(s) for s in seeds)
    except ValueError:
        return "_".join(seeds)
    if ints and ints == list(range(ints[0], ints[-1] + 1)) and len(ints) > 1:
        return f"{ints[0]}-{ints[-1]}"
    return "_".join(map(str, ints))


def train_name(seed: int) -> str:
    return f"train-seed-{seed}"


def student_name(method: str, seed: int, teacher_seeds: str, suffix: str = "") -> str:
    base = f"kd-seed-{seed}" if method == "kd" else f"sd-t{teacher_seeds}-s{seed}"
    return base + suffix


def settings(changed: dict) -> str:
    """A student's changed settings for its run name: {"temperature": 2.0} -> "-temperature=2"."""
    return "".join(f"-{k}={format(v, 'g') if isinstance(v, float) else v}" for k, v in changed.items())


def ensemble_name(member_seeds, member_role: str) -> str:
    return ("sd-" if member_role == "student" else "") + f"ensemble-seeds-{seed_label(member_seeds)}"


def joint_name(member_seeds) -> str:
    return f"joint-seeds-{seed_label(member_seeds)}"


def study_name(preset: str, dataset: str, label: str = "", seeds=None) -> str:
    """study-smoke-digits; with the recipe's group label when it is not the preset's own
    ("smoke · epochs=3"): study-smoke-digits-epochs=3; with ``seeds`` when they are not
    the default: study-smoke-digits-seeds=0-2."""
    changed = [part.replace(" ", "") for part in label.split(" · ")[1:]]
    return "-".join([f"study-{preset}-{dataset}", *changed, *([f"seeds={seed_label(seeds)}"] if seeds else [])])
