"""docker-compose.yml against the code it runs (Docker cannot run here, so nothing else would
notice a typo before a deployment does).

Every Verdict service's command, and each health check that calls a CLI, is walked through the
real command tree: `verdict ...` through the Typer app (`app.cli`), `celery ...` through
Celery's own click group, so a subcommand or an option that does not exist, or a value of the
wrong type, is a failure. Every `VERDICT_*` variable is a field of `Settings` and its value
validates; every variable the file substitutes is listed in `.env.example`; every
`build.target` is a stage of the Dockerfile; every `depends_on` names a service that can meet
its condition; every worker queue is a real queue, and the model workers are what the issue
asks (solo pool, a GPU each, the CUDA image). The checks themselves are tested on copies of the
file with one typo each (`test_each_check_catches_a_typo`).

The file is read through `scripts/stack_compose.py`, the module `make stack-smoke` reads it
with.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import typer.main
from celery.bin.celery import celery as celery_cli
from celery.worker.control import Panel
from pydantic import ValidationError

from app.cli import app as verdict_app
from app.cli_runs import default_node_name
from app.core.config import Settings
from app.kinds.queues import GPU_QUEUE, QUEUES
from scripts.stack_compose import (
    COMPOSE_FILE,
    DOCKERFILE,
    MissingVariable,
    as_argv,
    build_target,
    depends_on,
    dockerfile_targets,
    env_example_names,
    environment,
    healthcheck_argv,
    interpolate_tree,
    option_value,
    required_variables,
    variables,
)

SECRETS = {"VERDICT_SECRET_KEY": "kq3V9x-T7mZ_2pLw8RbNc4Hy6JdFs0Ue", "POSTGRES_PASSWORD": "pw"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
Doc = dict[str, Any]


def load(text: str) -> Doc:
    """The compose text as data, interpolated with the two required secrets set."""
    import yaml

    doc: Doc = interpolate_tree(yaml.safe_load(text), SECRETS)
    return doc


def ours(service: dict[str, Any]) -> bool:
    """A service that runs Verdict's image (built from the Dockerfile)."""
    return build_target(service) is not None


def always_on(service: dict[str, Any]) -> bool:
    """Started by a plain `docker compose up` (not only under a profile)."""
    return not service.get("profiles")


def cli_argvs(doc: Doc) -> list[tuple[str, list[str]]]:
    """(where, argv) of every command and health check of our services that calls a CLI."""
    found = []
    for name, service in doc["services"].items():
        if not ours(service):
            continue
        found.append((f"{name}.command", as_argv(service.get("command", ""))))
        test = (service.get("healthcheck") or {}).get("test")
        if test:
            argv = healthcheck_argv(test)
            if argv and argv[0] in ("verdict", "celery"):
                found.append((f"{name}.healthcheck", argv))
    return found


# --- walking a click command tree ---------------------------------------------------------------


# Typer vendors its own copy of click (`typer._click`) and Celery uses click itself: the walk
# goes by what the objects have (`commands`, `param_type_name`), not by their classes.
Command = Any


def is_group(command: Command) -> bool:
    return isinstance(getattr(command, "commands", None), dict)


def _params(command: Command, kind: str) -> list[Any]:
    return [p for p in command.params if p.param_type_name == kind]


def _find_option(command: Command, token: str) -> tuple[Any, bool]:
    """The option a token names, and whether the token carries its value (`--x=1`, `-t10`)."""
    name, eq, _ = token.partition("=")
    for param in _params(command, "option"):
        if name in (*param.opts, *param.secondary_opts):
            return param, bool(eq)
    if not token.startswith("--") and len(token) > 2:  # a short option with its value attached
        for param in _params(command, "option"):
            if token[:2] in param.opts:
                return param, True
    return None, False


def _options(command: Command, args: list[str], where: str) -> tuple[list[str], list[str]]:
    """Consume `command`'s options from args: (its positional arguments and whatever follows
    the first one when it is a group, problems)."""
    problems, positional, i = [], [], 0
    while i < len(args):
        token = args[i]
        if token == "--":
            positional += args[i + 1 :]
            break
        if token.startswith("-") and len(token) > 1:
            param, inline = _find_option(command, token)
            if param is None:
                problems.append(f"{where}: no option {token.partition('=')[0]}")
            elif not (param.is_flag or param.count) and not inline:
                i += 1  # its value
            i += 1
            continue
        if is_group(command):
            return args[i:], problems
        positional.append(token)
        i += 1
    return positional, problems


def click_problems(root: Command, argv: list[str]) -> list[str]:
    """What is wrong with argv as a call of the click command tree `root` (empty: nothing)."""
    command, where, args = root, argv[0], argv[1:]
    problems: list[str] = []
    while True:
        rest, found = _options(command, args, f"`{where}`")
        problems += found
        if not is_group(command):
            break
        if not rest:
            return [*problems, f"`{where}` needs a subcommand"]
        sub = command.commands.get(rest[0])
        if sub is None:
            return [*problems, f"`{where}` has no subcommand {rest[0]!r}"]
        command, where, args = sub, f"{where} {rest[0]}", rest[1:]
    arguments = _params(command, "argument")
    if any(a.nargs == -1 for a in arguments):
        return problems
    if len(rest) > sum(a.nargs for a in arguments):
        problems.append(f"`{where}`: unexpected arguments {rest}")
    if root is VERDICT_CLI and not problems:
        try:  # click's own parse: values of the wrong type, missing required options
            command.make_context(where, list(args), resilient_parsing=False)
        except Exception as exc:  # typer's click's UsageError, BadParameter, ...
            if not hasattr(exc, "format_message"):
                raise
            problems.append(f"`{where}`: {exc.format_message()}")
    return problems


VERDICT_CLI = typer.main.get_command(verdict_app)


def command_problems(doc: Doc) -> list[str]:
    """Every command of ours is a real `verdict` or `celery` call."""
    problems = []
    for where, argv in cli_argvs(doc):
        if not argv:
            problems.append(f"{where}: no command (the image's default is not checked)")
        elif argv[0] == "verdict":
            problems += [f"{where}: {p}" for p in click_problems(VERDICT_CLI, argv)]
        elif argv[0] == "celery":
            problems += [f"{where}: {p}" for p in click_problems(celery_cli, argv)]
            module = option_value(argv, "-A", "--app")
            if module is None or importlib.util.find_spec(module) is None:
                problems.append(f"{where}: -A {module} is not an importable module")
            if "inspect" in argv:
                action = argv[argv.index("inspect") + 1]
                if action not in Panel.meta or Panel.meta[action].type != "inspect":
                    problems.append(f"{where}: celery inspect has no {action!r}")
        else:
            problems.append(f"{where}: {argv[0]} is not a CLI of Verdict's image")
    return problems


def settings_problems(doc: Doc, text: str) -> list[str]:
    """Every VERDICT_* variable set or substituted is a setting, and each service's values
    are valid settings together."""
    fields = {f"VERDICT_{name.upper()}": name for name in Settings.model_fields}
    problems = [
        f"${{{name}}} is not a setting"
        for name in variables(text)
        if name.startswith("VERDICT_") and name not in fields
    ]
    for name, service in doc["services"].items():
        values = environment(service)
        unknown = sorted(v for v in values if v.startswith("VERDICT_") and v not in fields)
        problems += [f"{name}: {v} is not a setting" for v in unknown]
        known = {fields[v]: value for v, value in values.items() if v in fields}
        if ours(service) and not unknown:
            try:
                Settings.model_validate(known)
            except ValidationError as exc:
                problems.append(f"{name}: its settings do not validate: {exc}")
    return problems


def variable_problems(text: str) -> list[str]:
    """Every variable the file substitutes is listed in .env.example, and the secrets are
    required (compose refuses to start without them)."""
    listed = env_example_names()
    problems = [f"${{{v}}} is not in .env.example" for v in variables(text) if v not in listed]
    missing = set(SECRETS) - required_variables(text)
    problems += [f"{v} is not required (${{{v}:?...}})" for v in sorted(missing)]
    return problems


def target_problems(doc: Doc) -> list[str]:
    """Every build target is a Dockerfile stage; model workers build CUDA, the rest CPU."""
    targets = dockerfile_targets()
    problems = []
    for name, service in doc["services"].items():
        target = build_target(service)
        if target is None:
            continue
        if target not in targets:
            problems.append(f"{name}: build target {target!r} is not a stage of the Dockerfile")
        wanted = "cuda" if GPU_QUEUE in worker_queues(service) else "cpu"
        if target != wanted:
            problems.append(f"{name}: builds {target!r}, should build {wanted!r}")
    return problems


def dependency_problems(doc: Doc) -> list[str]:
    """depends_on names services that exist and can meet the condition; everything of ours
    waits for the migration to have succeeded."""
    services = doc["services"]
    problems = []
    for name, service in services.items():
        needs = depends_on(service)
        for other, condition in needs.items():
            if other not in services:
                problems.append(f"{name}: depends on {other!r}, which is no service")
            elif condition not in CONDITIONS:
                problems.append(f"{name}: unknown condition {condition!r}")
            elif condition == "service_healthy" and not services[other].get("healthcheck"):
                problems.append(f"{name}: waits for {other} to be healthy; it has no check")
            elif condition == "service_completed_successfully" and (
                services[other].get("restart", "no") != "no"
            ):
                problems.append(f"{name}: waits for {other} to complete; it restarts")
        waits = needs.get("migrate") == "service_completed_successfully"
        if ours(service) and name != "migrate" and not waits:
            problems.append(f"{name}: does not wait for migrate to succeed")
    return problems


def worker_queues(service: dict[str, Any]) -> list[str]:
    argv = as_argv(service.get("command", ""))
    if argv[:2] != ["verdict", "worker"]:
        return []
    return (option_value(argv, "-Q", "--queues") or "").split(",")


def worker_problems(doc: Doc) -> list[str]:
    """Worker queues are real; model workers use the solo pool and one GPU each; node names
    are distinct; each queue has a worker, and there is exactly one beat."""
    problems, names, consumed = [], Counter[str](), set()
    for name, service in doc["services"].items():
        queues = worker_queues(service)
        if not queues:
            continue
        argv = as_argv(service["command"])
        names[option_value(argv, "--name") or default_node_name(",".join(queues))] += 1
        problems += [f"{name}: -Q {q!r} is not a queue" for q in queues if q not in QUEUES]
        if always_on(service):
            consumed.update(queues)
        if GPU_QUEUE in queues:
            if option_value(argv, "--pool") != "solo":
                problems.append(f"{name}: a model worker must run --pool solo")
            reservation = service.get("deploy", {}).get("resources", {}).get("reservations", {})
            devices = [d for d in reservation.get("devices", []) if d.get("driver") == "nvidia"]
            if len(devices) != 1 or len(devices[0].get("device_ids", [])) != 1:
                problems.append(f"{name}: a model worker reserves exactly one NVIDIA GPU")
    problems += [f"node name {n!r} is used by {c} workers" for n, c in names.items() if c > 1]
    problems += [f"no worker consumes queue {q!r}" for q in QUEUES if q not in consumed]
    beats = [
        name
        for name, service in doc["services"].items()
        if as_argv(service.get("command", ""))[:2] == ["verdict", "scheduler"]
        and always_on(service)
    ]
    if len(beats) != 1:
        problems.append(f"exactly one beat should run; found {beats}")
    return problems


def all_problems(text: str) -> list[str]:
    doc = load(text)
    return [
        *command_problems(doc),
        *settings_problems(doc, text),
        *variable_problems(text),
        *target_problems(doc),
        *dependency_problems(doc),
        *worker_problems(doc),
    ]


# --- the tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text() -> str:
    return COMPOSE_FILE.read_text()


@pytest.fixture(scope="module")
def doc(text: str) -> Doc:
    return load(text)


def test_the_services_the_issue_asks_for(doc: Doc) -> None:
    expected = {"postgres", "redis", "migrate", "web", "worker-gpu", "worker-cpu", "beat"}
    assert expected <= set(doc["services"])
    assert doc["services"]["flower"]["profiles"] == ["flower"]
    assert as_argv(doc["services"]["migrate"]["command"]) == ["verdict", "db", "upgrade"]
    web = as_argv(doc["services"]["web"]["command"])
    assert web[:2] == ["verdict", "serve"] and int(option_value(web, "--workers") or 1) >= 2
    for service in doc["services"].values():
        if ours(service):
            assert environment(service)["VERDICT_LOG_FORMAT"] == "json"
    # The multiprocess directory is inside a tmpfs of its own container (`verdict serve`
    # deletes and recreates it at start, which it cannot do to a mount point).
    metrics = Path(environment(doc["services"]["web"])["VERDICT_METRICS_DIR"])
    assert str(metrics.parent) in doc["services"]["web"]["tmpfs"]


def test_every_command_and_option_exists(doc: Doc) -> None:
    assert command_problems(doc) == []


def test_every_setting_is_real_and_valid(doc: Doc, text: str) -> None:
    assert settings_problems(doc, text) == []


def test_every_variable_is_in_env_example_and_the_secrets_are_required(text: str) -> None:
    assert variable_problems(text) == []
    import yaml

    raw = yaml.safe_load(text)
    for secret in SECRETS:
        with pytest.raises(MissingVariable, match=secret):
            interpolate_tree(raw, {k: v for k, v in SECRETS.items() if k != secret})


def test_every_build_target_is_a_dockerfile_stage(doc: Doc) -> None:
    assert target_problems(doc) == []
    # Each target the compose file builds runs as an unprivileged user.
    stages = DOCKERFILE.read_text().split("\nFROM ")
    for target in {build_target(s) for s in doc["services"].values()} - {None}:
        (stage,) = [s for s in stages if s.split("\n", 1)[0].endswith(f" AS {target}")]
        assert "\nUSER verdict" in stage, target


def test_dependencies_exist_and_can_be_met(doc: Doc) -> None:
    assert dependency_problems(doc) == []


def test_workers_consume_real_queues_in_the_right_shape(doc: Doc) -> None:
    assert worker_problems(doc) == []


TYPOS = [
    ("--workers ${WEB", "--wrokers ${WEB"),  # an option the command lacks
    ("--workers ${WEB_WORKERS:-2}", "--workers two"),  # a value of the wrong type
    ("verdict scheduler", "verdict schedular"),  # a command that does not exist
    ("verdict db upgrade", "verdict db upgrad"),  # a subcommand that does not exist
    ("inspect ping", "inspect pnig"),  # a health check calling nothing
    ("-d cpu@$$HOSTNAME", "--dest cpu@$$HOSTNAME"),  # a celery option that does not exist
    ("VERDICT_LOG_FORMAT: json", "VERDICT_LOG_FROMAT: json"),  # a setting that does not exist
    ("VERDICT_LOG_FORMAT: json", "VERDICT_LOG_FORMAT: jsno"),  # a value the setting refuses
    ("${VERDICT_TORCH_THREADS:-1}", "${VERDICT_TORCH_THREAD:-1}"),  # not a setting, nor listed
    ("${POSTGRES_PASSWORD:?set", "${POSTGRES_PASSWORD:-set"),  # a secret no longer required
    ("-Q default", "-Q defualt"),  # a queue that does not exist
    ("target: cuda", "target: gpu"),  # a Dockerfile stage that does not exist
    ("migrate: { condition", "migrations: { condition"),  # a dependency that does not exist
    ('device_ids: ["0"]', 'device_ids: ["0", "1"]'),  # a model worker on two GPUs
    ("--name gpu1@%h", "--name gpu0@%h"),  # two workers with one node name
]


@pytest.mark.parametrize(("old", "new"), TYPOS, ids=[new for _, new in TYPOS])
def test_each_check_catches_a_typo(text: str, old: str, new: str) -> None:
    assert old in text, f"the typo's anchor {old!r} is no longer in the compose file"
    assert all_problems(text) == []
    assert all_problems(text.replace(old, new, 1)) != []


def test_the_checks_read_the_file_the_smoke_runs() -> None:
    # One reader for both: the smoke imports the same module (and so the same file).
    from scripts import stack_smoke

    assert (
        stack_smoke.COMPOSE_FILE
        == COMPOSE_FILE
        == Path(__file__).parents[2] / ("docker-compose.yml")
    )
