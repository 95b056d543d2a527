"""`radixserve serve --replicas` option plumbing, without starting Ray."""

from __future__ import annotations

import pytest

import subprocess
import sys

from radixserve.cli import build_parser


def test_a_plain_serve_never_imports_ray():
    code = ("import sys; from radixserve.cli import build_parser; import radixserve.server; "
            "args = build_parser().parse_args(['serve']); assert args.replicas == 0; "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)



def test_serve_config_args_become_the_same_application():
    pytest.importorskip("ray.serve")
    from radixserve.cluster.launch import app_from_options

    app = app_from_options({"replicas": 3, "router": "pow2", "model": "dummy:tiny", "num_blocks": 64,
                            "api_key": ["sk-a", "sk-b"], "cache_isolation": "per-key", "replica_gpus": 1})
    ingress = app._bound_deployment
    engine = ingress.init_args[0]._bound_deployment
    engine_config, server_config = engine.init_args
    assert engine.num_replicas == 3 and engine.ray_actor_options["num_gpus"] == 1
    assert "PowerOfTwo" in str(engine._deployment_config.request_router_config.request_router_class)
    assert engine_config.cache.num_blocks == 64 and engine_config.model.source == "dummy:tiny"
    assert server_config.api_keys == ["sk-a", "sk-b"] and server_config.namespace_from_api_key


def test_bad_cluster_options_are_refused():
    pytest.importorskip("ray.serve")
    from radixserve.cluster.launch import cluster_config_from_args

    with pytest.raises(ValueError, match="router_balance"):
        cluster_config_from_args(build_parser().parse_args(["serve", "--replicas", "2", "--router-balance", "-1"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--router", "round-robin"])
    from radixserve.cluster.config import ClusterConfig

    with pytest.raises(ValueError, match="router must be one of"):  # the Python API, past argparse's choices
        ClusterConfig(replicas=2, router="round-robin")
    for balance in ("inf", "nan"):
        with pytest.raises(ValueError, match="router_balance"):
            cluster_config_from_args(build_parser().parse_args(["serve", "--replicas", "2", "--router-balance", balance]))
