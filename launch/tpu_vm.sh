#!/usr/bin/env bash
# Run `jaxgen train CONFIG [key=value ...]` on every worker of a Cloud TPU VM or pod slice.
#
# Steps (each a gcloud command; --dry-run prints them instead):
#   1. create the TPU (--create) or check that it exists;
#   2. put the code on every worker: this checkout as a tarball (default) or a git clone (--repo);
#   3. on every worker: Python 3.11 venv in ~/jaxgen/.venv, `pip install -e ".[tpu]"`;
#   4. on every worker at once: `jaxgen train`. The processes find each other through the
#      TPU metadata (jaxgen.runtime.initialize_from_env), so one command starts the job.
# See launch/README.md.
set -euo pipefail

PROG=$(basename "$0")
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
# These two are pasted into commands that run on the workers, where $HOME is the
# worker's home: they must not expand here.
# shellcheck disable=SC2016
REMOTE_DIR='"$HOME"/jaxgen'       # expanded on the worker, not here
# shellcheck disable=SC2016
MOUNT_DIR='"$HOME"/jaxgen-bucket' # where --bucket is mounted on each worker

usage() {
  cat <<EOF
usage: $PROG --name NAME --zone ZONE --config CONFIG [options] [key=value ...]

Runs 'jaxgen train CONFIG [key=value ...]' on all workers of a Cloud TPU VM / pod slice.

required:
  --name NAME           TPU VM or pod slice name
  --zone ZONE           e.g. us-west4-a
  --config PATH         config file, relative to the repository root

options:
  --create              create the TPU first (needs --accelerator and --version)
  --accelerator TYPE    accelerator type for --create, e.g. v5litepod-16
  --version VERSION     TPU runtime for --create, e.g. v2-alpha-tpuv5-lite
  --spot                create a Spot TPU (with --create)
  --project PROJECT     gcloud project (default: gcloud's configured project)
  --repo URL            git-clone URL onto the workers instead of copying this checkout
  --ref REF             branch, tag or commit to check out with --repo (default: main)
  --bucket gs://B[/P]   mount bucket B on every worker (gcsfuse) and put the run
                        directory at P/RUN_NAME inside it: one shared run directory,
                        which a multi-worker slice needs for its checkpoints
  --run-dir DIR         run directory on the workers instead (a path all workers share)
  --run-name NAME       run directory name under --bucket (default: the config's file name)
  --dry-run             print every command instead of running it
  -h, --help            show this help

Arguments of the form key=value are passed to 'jaxgen train' as config overrides.
EOF
}

# Runs a command, or with --dry-run prints it as one copy-pasteable line prefixed by '+ '.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    echo "+ $(quote_all "$@")"
  else
    "$@"
  fi
}

NAME="" ZONE="" CONFIG="" ACCELERATOR="" VERSION="" PROJECT="" REPO="" REF="main"
BUCKET="" RUN_DIR="" RUN_NAME="" CREATE=0 SPOT=0 DRY_RUN=0
OVERRIDES=()

need_value() {
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value (see --help)"
}

while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --accelerator) need_value "$@"; ACCELERATOR=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --repo) need_value "$@"; REPO=$2; shift 2 ;;
    --ref) need_value "$@"; REF=$2; shift 2 ;;
    --bucket) need_value "$@"; BUCKET=$2; shift 2 ;;
    --run-dir) need_value "$@"; RUN_DIR=$2; shift 2 ;;
    --run-name) need_value "$@"; RUN_NAME=$2; shift 2 ;;
    --create) CREATE=1; shift ;;
    --spot) SPOT=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    *) die "unexpected argument '$1': overrides look like key=value (see --help)" ;;
  esac
done

[[ -n $NAME ]] || die "--name is required (see --help)"
[[ -n $ZONE ]] || die "--zone is required (see --help)"
[[ -n $CONFIG ]] || die "--config is required (see --help)"
if [[ $CREATE == 1 ]]; then
  [[ -n $ACCELERATOR ]] || die "--create needs --accelerator (e.g. v5litepod-16)"
  [[ -n $VERSION ]] || die "--create needs --version (e.g. v2-alpha-tpuv5-lite)"
elif [[ -n $ACCELERATOR || -n $VERSION || $SPOT == 1 ]]; then
  die "--accelerator, --version and --spot only apply with --create"
fi
[[ -z $BUCKET || -z $RUN_DIR ]] || die "give --bucket or --run-dir, not both"
[[ -z $BUCKET || $BUCKET =~ ^gs://[a-z0-9][a-z0-9._-]*(/.*)?$ ]] || die "--bucket $BUCKET is not gs://BUCKET[/PATH]"
# ${a[@]+"${a[@]}"}: an empty array under `set -u` on the bash 3.2 that macOS ships.
check_overrides ${OVERRIDES[@]+"${OVERRIDES[@]}"}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
[[ -f $ROOT/$CONFIG ]] || die "--config $CONFIG: no such file under $ROOT"
[[ -n $RUN_NAME ]] || RUN_NAME=$(basename "${CONFIG%.*}")

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
LOCATION=(--zone "$ZONE")
[[ -z $PROJECT ]] || LOCATION+=(--project "$PROJECT")

# ---------------------------------------------------------------- 1. the TPU
if [[ $CREATE == 1 ]]; then
  extra=()
  [[ $SPOT == 0 ]] || extra+=(--spot)
  run "${GCLOUD_TPU[@]}" create "$NAME" "${LOCATION[@]}" \
    --accelerator-type "$ACCELERATOR" --version "$VERSION" ${extra[@]+"${extra[@]}"}
else
  # Fails with gcloud's own message when the TPU does not exist.
  run "${GCLOUD_TPU[@]}" describe "$NAME" "${LOCATION[@]}" --format 'value(state)'
fi

# ---------------------------------------------------------------- 2. the code
REMOTE_SETUP="set -euo pipefail"
if [[ -n $REPO ]]; then
  # fetch + detached checkout works the same for a branch, a tag or a commit.
  REMOTE_SETUP+="; [ -d $REMOTE_DIR/.git ] || git clone --quiet $(quote "$REPO") $REMOTE_DIR"
  REMOTE_SETUP+="; git -C $REMOTE_DIR fetch --quiet origin $(quote "$REF")"
  REMOTE_SETUP+="; git -C $REMOTE_DIR checkout --quiet --force --detach FETCH_HEAD"
else
  # This checkout's committed files plus uncommitted edits to tracked files
  # (`git stash create` snapshots them without touching the work tree or the stash).
  TARBALL=$(mktemp -u "${TMPDIR:-/tmp}/jaxgen-src.XXXXXX").tar.gz
  if [[ $DRY_RUN == 1 ]]; then
    echo "+ git -C $(quote "$ROOT") archive --format=tar.gz -o $(quote "$TARBALL") \"\$(git stash create || echo HEAD)\""
  else
    snapshot=$(git -C "$ROOT" stash create)
    git -C "$ROOT" archive --format=tar.gz -o "$TARBALL" "${snapshot:-HEAD}"
    trap 'rm -f "$TARBALL"' EXIT
  fi
  run "${GCLOUD_TPU[@]}" scp "$TARBALL" "$NAME:jaxgen-src.tar.gz" "${LOCATION[@]}" --worker=all
  REMOTE_SETUP+="; mkdir -p $REMOTE_DIR; tar -xzf \"\$HOME\"/jaxgen-src.tar.gz -C $REMOTE_DIR"
fi

# ---------------------------------------------------------------- 3. the environment
# TPU VM images ship an older Python than jaxgen needs (>= 3.11).
REMOTE_SETUP+="; cd $REMOTE_DIR"
REMOTE_SETUP+="; command -v python3.11 >/dev/null || { sudo apt-get update -qq"
REMOTE_SETUP+=" && sudo apt-get install -y -qq python3.11 python3.11-venv; }"
REMOTE_SETUP+="; [ -x .venv/bin/python ] || python3.11 -m venv .venv"
REMOTE_SETUP+="; .venv/bin/pip install --quiet --upgrade pip"
REMOTE_SETUP+="; .venv/bin/pip install --quiet -e \".[tpu]\""
if [[ -n $BUCKET ]]; then
  bucket_path=${BUCKET#gs://}
  bucket_name=${bucket_path%%/*}
  prefix=${bucket_path#"$bucket_name"}
  # gcsfuse renames directories only up to --rename-dir-limit objects; checkpoints
  # are written to a temporary directory and renamed when complete.
  REMOTE_SETUP+="; command -v gcsfuse >/dev/null || { echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc]"
  REMOTE_SETUP+=" https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\""
  REMOTE_SETUP+=" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
  REMOTE_SETUP+=" && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
  REMOTE_SETUP+=" | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null"
  REMOTE_SETUP+=" && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; }"
  REMOTE_SETUP+="; mkdir -p $MOUNT_DIR"
  REMOTE_SETUP+="; mountpoint -q $MOUNT_DIR || gcsfuse --implicit-dirs --rename-dir-limit=200000"
  REMOTE_SETUP+=" $(quote "$bucket_name") $MOUNT_DIR"
  RUN_DIR_REMOTE="$MOUNT_DIR$(quote "$prefix/$RUN_NAME")"
elif [[ -n $RUN_DIR ]]; then
  RUN_DIR_REMOTE=$(quote "$RUN_DIR")
else
  RUN_DIR_REMOTE=""
  echo "$PROG: note: no --bucket or --run-dir: each worker writes runs/$RUN_NAME on its own disk" >&2
fi
run "${GCLOUD_TPU[@]}" ssh "$NAME" "${LOCATION[@]}" --worker=all --command "$REMOTE_SETUP"

# ---------------------------------------------------------------- 4. the run
TRAIN="cd $REMOTE_DIR && exec .venv/bin/jaxgen train $(quote "$CONFIG")"
[[ -z $RUN_DIR_REMOTE ]] || TRAIN+=" --run-dir $RUN_DIR_REMOTE"
[[ ${#OVERRIDES[@]} == 0 ]] || TRAIN+=" $(quote_all ${OVERRIDES[@]+"${OVERRIDES[@]}"})"
run "${GCLOUD_TPU[@]}" ssh "$NAME" "${LOCATION[@]}" --worker=all --command "$TRAIN"
