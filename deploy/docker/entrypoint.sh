#!/bin/sh
# The image's entrypoint: runs one Mnemosyne service in the foreground (exec, so the service gets
# SIGTERM from tini directly and drains).
#   entrypoint.sh router|prefill|decode|kvstore [FLAGS...]   python -m services.<name> FLAGS
#   entrypoint.sh cli [ARGS...]                               python -m common.cli ARGS (a client)
set -eu

usage() {
    echo "usage: $0 {router|prefill|decode|kvstore} [FLAGS...]   (FLAGS: $0 <service> --help)"
    echo "       $0 cli {generate|demo|worker} [ARGS...]"
}

case "${1:-}" in
    router|prefill|decode|kvstore)
        service=$1
        shift
        exec python -m "services.$service" "$@"
        ;;
    cli)
        shift
        exec python -m common.cli "$@"
        ;;
    -h|--help)
        usage
        ;;
    *)
        echo "$0: unknown service '${1:-}'" >&2
        usage >&2
        exit 2
        ;;
esac
