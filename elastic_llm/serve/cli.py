"""``elastic-llm serve``: its options and what runs them (kept here, beside the gateway)."""

from __future__ import annotations

import argparse
import sys

from elastic_llm.errors import ElasticLLMError
from elastic_llm.scheduling.factory import SCHEDULER_NAMES
from elastic_llm.serve.settings import API_KEY_ENV, GatewaySettings, api_key_from_environment

POLICIES = ("spotserve", "reroute", "reparallelize")


def add_serve_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``serve`` command to the `elastic-llm` parser."""
    cmd = sub.add_parser(
        "serve", help="serve an OpenAI-compatible HTTP API (/v1/chat/completions, ...) from a Dask cluster",
        description="Connect to a Dask scheduler (--scheduler / --scheduler-file) or start a LocalCluster, "
                    "register the elastic controller and serve /v1/models, /v1/completions and "
                    "/v1/chat/completions (server-sent events with stream: true), /health and /metrics. "
                    f"The API key comes from --api-key or ${API_KEY_ENV}; without either the endpoint is open.")
    cmd.add_argument("--model", default="smollm2-135m-instruct",
                     help="embedded model name or checkpoint directory (the workers load it)")
    cmd.add_argument("--served-model-name", default=None,
                     help="the id clients pass as 'model' (default: --model)")
    cmd.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    cmd.add_argument("--port", type=int, default=8000, help="port (0: any free one; default 8000)")
    where = cmd.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None, metavar="ADDRESS", help="a running Dask scheduler")
    where.add_argument("--scheduler-file", default=None, help="the scheduler file of `dask scheduler`")
    cmd.add_argument("--workers", type=int, default=1, help="LocalCluster workers when no scheduler is given")
    cmd.add_argument("--in-process", action="store_true",
                     help="LocalCluster workers as threads of this process (small models, tests)")
    cmd.add_argument("--policy", choices=POLICIES, default="spotserve", help="controller policy")
    cmd.add_argument("--max-batch-size", type=int, default=16, help="requests per replica iteration")
    cmd.add_argument("--request-scheduler", choices=SCHEDULER_NAMES, default="fcfs",
                     help="each replica's request policy (default fcfs; las-predicted ranks by an output-length "
                          "predictor fitted on the default model's answers: see docs/benchmarks.md)")
    cmd.add_argument("--metadata-watcher", choices=("aws", "gcp", "azure"), default=None,
                     help="every worker (also those that join later) polls this cloud's metadata "
                          "service for its preemption notice")
    cmd.add_argument("--min-step-seconds", type=float, default=0.0,
                     help="pace replica iterations to at least this long (emulates a slower instance)")
    cmd.add_argument("--api-key", default=None, help=f"required bearer key (default: ${API_KEY_ENV})")
    cmd.add_argument("--max-body-bytes", type=int, default=512 * 1024, help="largest request body (413 above)")
    cmd.add_argument("--max-pending", type=int, default=64,
                     help="unfinished generations at most; more get 429 (the bounded queue)")
    cmd.add_argument("--max-n", type=int, default=8, help="most choices (n x prompts) per request")
    cmd.add_argument("--default-max-tokens", type=int, default=256, help="chat max_tokens when not given")
    cmd.add_argument("--drain-timeout", type=float, default=30.0,
                     help="seconds SIGTERM waits for running requests before cancelling them")
    cmd.add_argument("--replicas-timeout", type=float, default=600.0,
                     help="seconds to wait for the first replica to be ready")
    cmd.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def run_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``elastic-llm serve``; bad options exit 2 with a message."""
    from elastic_llm.serve.server import ClusterOptions, serve

    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    try:
        settings = GatewaySettings(
            model_name=args.served_model_name or args.model, api_key=api_key_from_environment(args.api_key),
            max_body_bytes=args.max_body_bytes, max_pending=args.max_pending, max_n=args.max_n,
            default_max_tokens=args.default_max_tokens, drain_timeout_s=args.drain_timeout)
        cluster = ClusterOptions(scheduler=args.scheduler, scheduler_file=args.scheduler_file,
                                 local_workers=args.workers, local_processes=not args.in_process,
                                 model=args.model, policy=args.policy, max_batch_size=args.max_batch_size,
                                 request_scheduler=args.request_scheduler,
                                 min_step_seconds=args.min_step_seconds,
                                 metadata_provider=args.metadata_watcher,
                                 replicas_timeout_s=args.replicas_timeout)
    except ElasticLLMError as exc:
        parser.error(str(exc))
    try:
        serve(cluster, settings, args.host, args.port, args.log_level)
    except (ElasticLLMError, TimeoutError) as exc:
        print(f"elastic-llm: error: {exc}", file=sys.stderr)
        return 2
    return 0
