"""TEACHER_MODEL_PATH=/path/to/teacher python -m opd.main_opd [platform=cpu] data.train_files=... actor_rollout_ref.model.path=...

On-policy distillation: the student (``actor_rollout_ref.model.path``) generates ``rollout.n`` responses
per prompt; the teacher (``TEACHER_MODEL_PATH`` or ``opd.teacher_path``) scores the same tokens; the
student minimises ``opd.loss_type`` over its own model-generated tokens (tool tokens masked) in the
two-phase worker (``opd.distill.worker``). Options: ``src/opd/config/opd_trainer.yaml``.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from opd.data.checks import InputError, deferred, resolve_model_dir
from opd.distill.config import OPDConfig, OPDConfigError, check_trainer
from opd.runtime import check_inputs, exit_on_input_error, prepare


def check_opd(config: DictConfig) -> OPDConfig:
    """The ``opd:`` group as a typed config, and the verl settings the OPD step reads (no model is read)."""
    from omegaconf import OmegaConf

    try:
        opd = OPDConfig.from_mapping(OmegaConf.to_container(config.opd, resolve=True))
        check_trainer(opd, OmegaConf.to_container(config.actor_rollout_ref, resolve=True))
    except OPDConfigError as error:
        raise InputError(str(error)) from error
    return opd


def check_teacher(config: DictConfig) -> None:
    """Teacher present, same tokenizer as the student; fills opd.vocab_size and the ref model's path."""
    from transformers import AutoConfig, AutoTokenizer

    from opd.distill.losses import aligned_vocab_size

    opd = config.opd
    student = config.actor_rollout_ref.model.path
    if opd.get("teacher", "model") == "self":
        # a frozen copy of the initial student: verl loads the same weights once more as the ref model, which
        # the optimizer never touches (resumed runs too: model.path is the initial student)
        teacher = student
    elif not opd.teacher_path:
        raise InputError(
            "no teacher: export TEACHER_MODEL_PATH=/path/to/teacher_model (or pass opd.teacher_path=...), or "
            "distill the student from itself with opd.teacher=self"
        )
    else:
        teacher = resolve_model_dir(opd.teacher_path, "teacher", "TEACHER_MODEL_PATH / opd.teacher_path")
    if deferred(student) or deferred(teacher):  # an earlier run of the chain writes it: checked in the job
        with open_dict(config):
            if opd.get("teacher", "model") != "self":
                opd.teacher_path = teacher
            if config.actor_rollout_ref.ref.get("model") is None:
                config.actor_rollout_ref.ref.model = {}
            config.actor_rollout_ref.ref.model.path = teacher
        return
    student_tokenizer = AutoTokenizer.from_pretrained(student)
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher)
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise InputError(
            f"the teacher's tokenizer ({teacher}) differs from the student's ({student}): token-level "
            "distillation needs one shared tokenizer; pick a teacher from the same model family"
        )
    student_width = AutoConfig.from_pretrained(student).vocab_size
    teacher_width = AutoConfig.from_pretrained(teacher).vocab_size
    try:
        vocab_size = aligned_vocab_size(student_width, teacher_width, len(student_tokenizer))
    except ValueError as error:  # a head narrower than the tokenizer: name both models and the fix
        raise InputError(
            f"{error} (student {student}, teacher {teacher}): use models whose output heads cover the "
            "tokenizer, e.g. a teacher of the student's model family"
        ) from error
    with open_dict(config):
        if opd.get("teacher", "model") != "self":
            opd.teacher_path = teacher
        opd.vocab_size = vocab_size
        ref = config.actor_rollout_ref.ref
        if ref.get("model") is None:
            ref.model = {}
        ref.model.path = teacher


CONFIG_NAME = "opd_trainer"


def check_teacher_context(config: DictConfig, opd: OPDConfig) -> None:
    """With ``opd.teacher_context.field``: every training row has that context (the reference the teacher's
    prompt carries); refused before Ray starts, with the column and the count of rows that lack it."""
    if not opd.teacher_context.active:
        return
    from opd.distill.context import MissingContextError, data_has_field

    files = config.data.train_files
    files = [files] if isinstance(files, str) else list(files)
    field = opd.teacher_context.field
    try:
        total, missing = data_has_field(files, field)
    except MissingContextError as error:
        raise InputError(str(error)) from error
    if missing:
        raise InputError(
            f"opd.teacher_context.field={field}: {missing} of {total} training rows have no value there; the "
            "teacher's prompt needs a reference in every row (fill it in the data, or set "
            "opd.teacher_context.field=null)"
        )


def check_stored_rollouts(config: DictConfig, opd: OPDConfig) -> None:
    """With ``opd.rollouts=stored``: the training files are rollouts files (token ids, masks, scores)."""
    if opd.rollouts != "stored":
        return
    from opd.distill.stored import RolloutsError, check_files

    files = config.data.train_files
    files = [files] if isinstance(files, str) else list(files)
    if any(deferred(f) for f in files):  # an earlier run of the chain writes them: checked in the job
        return
    try:
        check_files(files)
    except RolloutsError as error:
        raise InputError(str(error)) from error


def check_config(config: DictConfig) -> None:
    """The typed OPD config, student, data and teacher: everything a run needs before Ray starts."""
    opd = check_opd(config)
    check_stored_rollouts(config, opd)
    check_inputs(config)
    check_teacher(config)
    check_teacher_context(config, opd)


@hydra.main(config_path="config", config_name=CONFIG_NAME, version_base=None)
def main(config: DictConfig) -> None:
    try:
        config = prepare(config, run_dir=HydraConfig.get().runtime.output_dir, check=check_config)
    except InputError as error:
        exit_on_input_error(error)
    import ray
    from verl.trainer.main_ppo import run_ppo

    from opd.distill.trainer import OPDTaskRunner

    run_ppo(config, task_runner_class=ray.remote(num_cpus=1)(OPDTaskRunner))


if __name__ == "__main__":
    main()
