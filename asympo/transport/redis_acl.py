"""Redis ACL users of a deployment: one user per service, each limited to its own keys.

The table :data:`USERS` is the one place that says which keys and commands each service
may use; it was derived from the code (asympo/transport/streams/, asympo/transport/stream_trim.py,
services/*), and tests/integration/test_redis_acl.py drives the real stream code through
a real ``redis-server`` loaded with the rendered file, so an operation a service needs and
the table forgets fails there. Render the file the manifests load with
``python -m asympo.transport.redis_acl > deploy/k8s/base/redis-users.acl`` (a test checks it is
current).

Each stream has exactly one producing user, and consumers only get the consumer-group
commands on their input stream (Redis 7 selectors pair commands with key patterns):

* weights appends version announcements to ``weights``;
* learner admits prompts (``prompts``, the admission counter) and consumes ``scored``;
* rollout consumes ``prompts``, appends ``rollouts``, reads ``weights``;
* reward consumes ``rollouts``, appends ``scored``;
* every consumer may append to ``dead-letter`` and trim its input stream.

So rollout cannot forge scored groups or prompts, reward cannot forge rollouts, nobody
but the learner admits prompts, and no user may FLUSHALL, CONFIG, KEYS, DEBUG, ... The
``default`` user is off; ``healthcheck`` (no password) may only PING, for probes.

Passwords are not in the file: each user line carries the placeholder
:data:`PASSWORD_SLOT`, which :data:`START_SCRIPT` (the Redis container's command in
docker-compose.yml and deploy/k8s/base/redis.yaml) replaces with the user's password from
``$REDIS_PASSWORD_<USER>`` or ``/run/secrets/redis_password_<user>``. An unreplaced slot
is an invalid password hash, so Redis refuses to start rather than run without it.
Key patterns cover every run id (``asympo:*:<stream>``); the run id may not contain
``:``, so ``*`` cannot reach into another stream's name. Needs Redis 7.0 or newer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from asympo.config import StreamSettings

PASSWORD_SLOT = "#{password}"
_KEY_PREFIX = "asympo:*:"

# A consumer of one stream through its consumer group (asympo.transport.streams.Consumer): read,
# reclaim, ack, lag, and the trim script (asympo.transport.stream_trim: EXISTS TYPE XINFO XPENDING
# XTRIM). No XADD: consuming a stream never lets a service write into it.
CONSUMER_COMMANDS = (
    "xgroup|create", "xreadgroup", "xautoclaim", "xclaim", "xpending", "xrange", "xack",
    "xinfo|groups", "eval", "exists", "type", "xtrim",
)  # fmt: skip
# Appending to a stream (Producer, the produce-and-ack script, the dead-letter MULTI).
PRODUCER_COMMANDS = ("xadd",)
# Connection upkeep and transactions (MULTI/EXEC hold no keys: each queued command is
# checked on its own). SCRIPT LOAD/EXISTS: redis-py's Script loads before EVALSHA.
ROOT_COMMANDS = ("ping", "multi", "exec", "discard")
SCRIPT_COMMANDS = ("script|load", "script|exists")


@dataclass(frozen=True)
class Grant:
    """Commands allowed on the keys matching ``patterns`` (read-only if ``read_only``)."""

    patterns: tuple[str, ...]
    commands: tuple[str, ...]
    read_only: bool = False

    def rule(self) -> str:
        """This grant as an ACL selector: ``(~pattern ... +command ...)``."""
        access = "%R~" if self.read_only else "~"
        keys = " ".join(access + p for p in self.patterns)
        return f"({keys} {' '.join('+' + c for c in self.commands)})"


@dataclass(frozen=True)
class User:
    """One service's ACL user: its grants and, if it runs scripts, their key set."""

    name: str
    purpose: str
    grants: tuple[Grant, ...] = ()
    # EVALSHA of asympo.transport.streams' produce-and-ack script names all its keys at once (once
    # key, input, output); each command inside is still checked against the grants.
    script_keys: tuple[str, ...] = ()
    password: bool = True
    root_commands: tuple[str, ...] = field(default=ROOT_COMMANDS)

    def line(self) -> str:
        """The user's line of users.acl (password slot, not the password)."""
        root = list(self.root_commands)
        if self.script_keys:
            root += SCRIPT_COMMANDS
        parts = ["user", self.name, PASSWORD_SLOT if self.password else "nopass", "on",
                 "resetchannels", "-@all", *("+" + c for c in root)]  # fmt: skip
        parts += [g.rule() for g in self.grants]
        if self.script_keys:
            parts.append(Grant(self.script_keys, ("evalsha",)).rule())
        return " ".join(parts)


def _key(name: str) -> str:
    return _KEY_PREFIX + name


def users(streams: StreamSettings | None = None) -> tuple[User, ...]:
    """The ACL users of a deployment whose stream names are ``streams``' (defaults)."""
    s = streams or StreamSettings()
    prompts, rollouts, scored = _key(s.prompts), _key(s.rollouts), _key(s.scored)
    weights, dead = _key(s.weights), _key(s.dead_letter)
    rollout_once = _key("once:rollout:*")  # services/rollout/worker.py _once_key
    reward_once = _key("reward-done:*")  # services/reward/worker.py once_prefix
    admitted = _key("learner:admitted")  # services/learner/admission.py count_key
    dead_letter = Grant((dead,), PRODUCER_COMMANDS)
    return (
        User("weights", "appends version announcements (services/weights/server.py)",
             grants=(Grant((weights,), PRODUCER_COMMANDS),)),
        User("learner", "admits prompts, consumes scored groups (services/learner/)",
             grants=(Grant((prompts,), PRODUCER_COMMANDS),
                     Grant((admitted,), ("get", "set")),
                     Grant((scored,), CONSUMER_COMMANDS),
                     dead_letter)),
        User("rollout", "consumes prompts, produces rollout groups, follows weights",
             grants=(Grant((prompts,), CONSUMER_COMMANDS),
                     Grant((rollouts,), PRODUCER_COMMANDS),
                     Grant((rollout_once,), ("set",)),
                     Grant((weights,), ("xread",), read_only=True),
                     dead_letter),
             script_keys=(rollout_once, prompts, rollouts)),
        User("reward", "consumes rollout groups, produces scored groups",
             grants=(Grant((rollouts,), CONSUMER_COMMANDS),
                     Grant((scored,), PRODUCER_COMMANDS),
                     Grant((reward_once,), ("set", "exists")),
                     dead_letter),
             script_keys=(reward_once, rollouts, scored)),
        User("healthcheck", "PING only, for the container's probes", password=False,
             root_commands=("ping",)),
    )  # fmt: skip


SERVICE_USERS = ("weights", "learner", "rollout", "reward")


def render(streams: StreamSettings | None = None) -> str:
    """users.acl: ``default`` off, then one line per user (password slots unfilled)."""
    lines = [
        "# Generated by `python -m asympo.transport.redis_acl`; do not edit.",
        "# Passwords are filled in at start by the Redis container's command (see there).",
        "user default off resetpass resetkeys resetchannels -@all",
    ]
    for user in users(streams):
        lines += [f"# {user.name}: {user.purpose}", user.line()]
    return "\n".join(lines) + "\n"


# The Redis container's command (compose: entrypoint, with "$" written "$$"; Kubernetes:
# command). It reads the rules from $REDIS_ACL (Kubernetes: the asympo-redis-acl
# ConfigMap) or /etc/asympo/redis-users.acl (compose: this repository's file), drops the
# comments (ACL files have none), fills each password slot, writes the result where only
# Redis can read it, and execs redis-server with the container's arguments. Passwords are
# limited to URL-safe characters, so sed needs no escaping and URLs no quoting.
START_SCRIPT = r"""set -euf
umask 077
rules=${REDIS_ACL:-$(cat /etc/asympo/redis-users.acl)}
out=${REDIS_ACL_OUT:-/tmp/redis-users.acl}
: > "$out"
IFS='
'
for line in $rules; do
  case "$line" in
    '#'*) continue;;
    *'#{password}'*)
      name=${line#user }; name=${name%% *}
      var=REDIS_PASSWORD_$(printf '%s' "$name" | tr a-z A-Z)
      eval "pw=\${$var:-}"
      [ -n "$pw" ] || pw=$(cat "/run/secrets/redis_password_$name" 2>/dev/null || true)
      case "$pw" in
        ''|*[!A-Za-z0-9._~-]*)
          echo "redis: password of ACL user $name missing, empty or not [A-Za-z0-9._~-]" >&2
          exit 78;;
      esac
      line=$(printf '%s' "$line" | sed "s/#{password}/>$pw/");;
  esac
  printf '%s\n' "$line" >> "$out"
done
exec redis-server "$@" --aclfile "$out" --protected-mode no
"""


def main(argv: list[str] | None = None) -> int:
    """``python -m asympo.transport.redis_acl``: print users.acl; ``script``: the start script."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["script"]:
        sys.stdout.write(START_SCRIPT)
    elif not args:
        sys.stdout.write(render())
    else:
        print("usage: python -m asympo.transport.redis_acl [script]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
