"""Start Flower against our broker, with authentication, or refuse to start.

    python -m worker.flower [--port 5555] [--address 0.0.0.0] [extra flower options]

FLOWER_BASIC_AUTH="user:password[,user2:password2]" is required. Flower reads that variable
itself, so the password never appears on a command line (`ps`, shell history). Without it
the launcher exits with status 2, unless FLOWER_INSECURE_DEV=1 is set, a development-only
escape hatch that starts Flower without authentication, bound to 127.0.0.1 only (another
address, from --address or FLOWER_ADDRESS, is refused), and says so loudly.
FLOWER_UNAUTHENTICATED_API is always refused: Flower's API can send and revoke tasks.

What Flower shows: task names, states, runtimes, retries, worker pools and queues. Task
arguments carry ids only: the enqueue API publishes {"job_id": N}; a sender that calls
writeback.* by name with the intent (markdown included) should pass `kwargsrepr=` (e.g.
kwargsrepr=repr({"session_id": 5})); the worker also rewrites the "received" event's
arguments to ids only (worker.signals), which is what Flower keeps for each task. Flower's
/healthcheck and /metrics answer without authentication; neither carries task arguments.
"""
from __future__ import annotations

import os
import sys

AUTH_VAR = "FLOWER_BASIC_AUTH"
DEV_FLAG = "FLOWER_INSECURE_DEV"
ADDRESS_VAR = "FLOWER_ADDRESS"
UNAUTH_API_VAR = "FLOWER_UNAUTHENTICATED_API"
DEV_ADDRESS = "127.0.0.1"


class FlowerConfigError(SystemExit):
    pass


def check_auth(env: dict[str, str]) -> str | None:
    """Returns a warning for the insecure mode, None when auth is set; raises when neither."""
    raw = env.get(AUTH_VAR, "").strip()
    if raw:
        for pair in raw.split(","):
            user, sep, password = pair.partition(":")
            if not sep or not user.strip() or not password:
                raise FlowerConfigError(f"{AUTH_VAR} must be user:password pairs separated by commas "
                                        "(a password cannot contain a comma)")
            if len(password) < 12:
                raise FlowerConfigError(f"{AUTH_VAR}: the password for {user!r} is shorter than 12 characters")
        return None
    if env.get(DEV_FLAG, "").strip() == "1":
        return (f"WARNING: {DEV_FLAG}=1: Flower is starting WITHOUT authentication, on {DEV_ADDRESS} only. "
                "Anyone on this machine can see every task and revoke or send tasks. Never use this outside a "
                "laptop.")
    raise FlowerConfigError(f"refusing to start Flower without authentication: set {AUTH_VAR}=user:password "
                            f"(or, on a development machine only, {DEV_FLAG}=1)")


def check_exposure(env: dict[str, str], argv: list[str], *, dev: bool) -> list[str]:
    """The argv to start Flower with; raises when the set-up would expose it. Flower's
    unauthenticated API (send, revoke, terminate tasks) is never allowed; without
    authentication Flower listens on loopback only, so only this machine reaches it."""
    if env.get(UNAUTH_API_VAR, "").strip().lower() not in ("", "0", "false", "no"):
        raise FlowerConfigError(f"refusing {UNAUTH_API_VAR}: Flower's API can send and revoke tasks and must "
                                "stay behind authentication; unset it")
    if not dev:
        return argv
    given = [env[ADDRESS_VAR].strip()] if env.get(ADDRESS_VAR, "").strip() else []
    for i, arg in enumerate(argv):
        if arg.startswith("--address="):
            given.append(arg.partition("=")[2])
        elif arg == "--address":
            given.append(argv[i + 1] if i + 1 < len(argv) else "")
    wrong = [a for a in given if a != DEV_ADDRESS]
    if wrong:
        raise FlowerConfigError(f"{DEV_FLAG}=1 runs Flower without authentication, so it binds to {DEV_ADDRESS} "
                                f"only; refusing address {wrong[0]!r} (set {AUTH_VAR} to serve other addresses)")
    return argv if given else [*argv, f"--address={DEV_ADDRESS}"]


def command(argv: list[str]) -> list[str]:
    args = list(argv)
    if not any(a.startswith("--port") for a in args):
        args.append(f"--port={os.environ.get('PORT', os.environ.get('FLOWER_PORT', '5555'))}")
    return [sys.executable, "-m", "celery", "-A", "worker", "flower", *args]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    env = dict(os.environ)
    try:
        warning = check_auth(env)
        argv = check_exposure(env, argv, dev=warning is not None)
    except FlowerConfigError as err:
        print(f"psa-writeback flower: {err}", file=sys.stderr)
        return 2
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if any(a.startswith("--basic-auth") or a.startswith("--basic_auth") for a in argv):
        print("psa-writeback flower: pass credentials in FLOWER_BASIC_AUTH, not on the command line",
              file=sys.stderr)
        return 2
    # Flower maps every FLOWER_* variable to an option and fails on unknown ones.
    env.pop(DEV_FLAG, None)
    cmd = command(argv)
    os.execvpe(cmd[0], cmd, env)
    return 0  # pragma: no cover - exec does not return


if __name__ == "__main__":
    sys.exit(main())
