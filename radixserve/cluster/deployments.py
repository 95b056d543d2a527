"""The Ray Serve application: an HTTP ingress and N engine replicas behind a request router.

    client --HTTP--> ingress (IngressCore, any route) --DeploymentHandle + router-->
        EngineReplica (the unchanged single-server app: create_app, driven in-process over ASGI)

The ingress is the launching process's own HTTP server (`http_ingress_app`, `radixserve serve
--replicas`: one Ray hop per request) or, from a Serve config, the `Ingress` deployment behind
Serve's HTTP proxy.

The ingress does not re-implement any API: it reads the body, computes a routing hint (the
prompt's content keys, routing_hint.py), and forwards the raw request; the replica runs it
through the same FastAPI app as `radixserve serve`, and streams the response back: the first
item carries status, headers and the first body chunk (the whole body of a non-streaming
response: one message), each later item every chunk ready by then. So auth,
errors, streaming, named caches and usage behave exactly as on one server. Each response carries
`x-radixserve-replica: <replica id>`. Every hop costs a round trip (docs/scaling.md, "What routing
adds"), so the path makes as few as it can: the ingress's one call to a replica goes over Serve's
gRPC handle path, its router on the loop that serves HTTP (HANDLE_OPTIONS, routing_handle).

The router is pluggable: ``router="cache-aware"`` (ours, router.py), ``"pow2"`` (Ray's default)
or ``"prefix-affinity"`` (Ray Serve LLM's PrefixCacheAffinityRouter), for side-by-side runs.
"""


import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig

from radixserve.cache.block_keys import CacheIdentity
from radixserve.cluster.config import ClusterConfig
from radixserve.cluster.kv_events import KVEventRecorder
from radixserve.cluster.metrics import cluster_metrics, label_metrics
from radixserve.cluster.routing_hint import PieceMemoTokenizer, RoutedRequest, RoutingProfile, prompt_hint, tenant_of
from radixserve.cluster.shared_state import STATE_ACTOR_NAME, get_or_create_state_actor
from radixserve.config import EngineConfig
from radixserve.server.caches import CacheRegistry, NamedCache
from radixserve.server.config import ServerConfig
from radixserve.server.state import wait_for_disconnect

log = logging.getLogger("radixserve.cluster")

REPLICA_HEADER = "x-radixserve-replica"
INLINE_HINT_BYTES = 2048  # bodies this small get their routing hint on the event loop
# The replica's handler runs on the actor's own event loop instead of a second one in a thread
# Ray hands every call to (our handler awaits; the engine has its own thread): 0.7-1.0 ms less
# per request on the 2-core box, docs/scaling.md "What routing adds, hop by hop".
REPLICA_ENV_VARS = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
# No Serve access-log line per call on the replicas: each one was written to a file and to
# stderr, which Ray's log monitor tails and ships to the driver (the ingress) to print: CPU in
# four processes per request. The ingress's uvicorn logs each request once, where it is served,
# as the plain server does.
REPLICA_LOGGING = {"enable_access_log": False}
# How the ingress calls the engine deployment: the handle's data plane is gRPC straight to the
# replica (Ray Serve's own fast path, which its RAY_SERVE_THROUGHPUT_OPTIMIZED turns on for every
# handle) instead of a streaming Ray actor call, whose every item the replica reports back to the
# caller's core worker; plain pickle for our plain dataclasses and dicts (cloudpickle is a
# pure-Python pickler). A handle call measured 2.0-2.3 vs 3.5-5.1 ms p50, and half the CPU on
# both ends (docs/scaling.md, "What routing adds, hop by hop").
HANDLE_OPTIONS = {"stream": True, "_by_reference": False, "request_serialization": "pickle",
                  "response_serialization": "pickle"}
# Targeted /metrics calls per replica under Ray's routers, a short pause after each miss: pow2
# misses 32 times in ~1e-10; prefix-affinity sends a text that matches nothing to the replica
# with the smallest prefix tree, which only changes once the tree actor has taken the last
# call's text (inserted without waiting: under load it lags, and back-to-back calls all missed).
METRICS_ATTEMPTS = 32
METRICS_RETRY_PAUSE_S = 0.02
# Named-cache definitions the ingress remembers (5 s each), by the id a request names.
NAMED_CACHE_MEMO = 1024
# Requests Serve lets one engine replica hold at once (its queue-length guard; the engine's own
# scheduler decides what runs); the ingress may hold four times the whole deployment's.
MAX_ONGOING_REQUESTS = 64
ROUTERS = {
    "cache-aware": "radixserve.cluster.router:CacheAwareRouter",
    "pow2": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
    "prefix-affinity": "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router:"
                       "PrefixCacheAffinityRouter",
}


class ActorCacheRegistry(CacheRegistry):
    """Named-cache definitions in the ClusterState actor (shared by every replica)."""

    shared = True

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def save(self, cache: NamedCache) -> None:
        await self.actor.put_cache.remote(cache)

    async def load(self, cache_id: str) -> NamedCache | None:
        return await self.actor.get_cache.remote(cache_id)

    async def delete(self, cache_id: str) -> None:
        await self.actor.delete_cache.remote(cache_id)

    async def list(self, owner: str) -> list[NamedCache]:
        return await self.actor.list_caches.remote(owner)


class EngineReplica:
    """One engine + the single-server app, as a Serve replica. Publishes its KV events."""

    async def __init__(self, engine_config: EngineConfig, server_config: ServerConfig,
                       event_interval_s: float = 0.05, heartbeat_s: float = 1.0,
                       state_actor_name: str = STATE_ACTOR_NAME) -> None:
        from radixserve.server import create_app

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.state_actor = get_or_create_state_actor(state_actor_name)
        # in-thread: the replica's KV-event recorder observes the engine's radix tree directly
        in_thread = dataclasses.replace(server_config, engine_process="off")
        self.app = await asyncio.to_thread(create_app, engine_config, in_thread)  # loads the model
        self.state = self.app.state.radixserve
        self.state.caches.registry = ActorCacheRegistry(self.state_actor)
        engine = self.state.engine
        identity = CacheIdentity(model=engine.cache_identity, block_size=engine.block_size)
        self.recorder = KVEventRecorder(identity)
        engine.attach_tree_observer(self.recorder)
        self.profile = RoutingProfile(engine.tokenizer, identity, server_config)
        await self.state_actor.set_profile.remote(self.profile)
        self.state_incarnation: str | None = None  # the ClusterState this replica last published to
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # starts the engine thread, as uvicorn would
        self.event_interval_s = event_interval_s
        self.heartbeat_s = heartbeat_s
        self._publisher = asyncio.get_running_loop().create_task(self._publish_forever())
        log.info("replica %s ready (%s)", self.replica_id, engine.model_id)

    async def handle(self, request: RoutedRequest) -> AsyncIterator[Any]:
        """Run one forwarded HTTP request through the app: yields {status, headers, body, more_body},
        then (while more_body) the body chunks."""
        if request.target_replica is not None and request.target_replica != self.replica_id:
            yield {"status": 404, "headers": [(b"content-type", b"application/json")],
                   "body": b'{"error": {"message": "that replica is gone", "type": "not_found"}}', "more_body": False}
            return
        async for item in call_asgi(self.app, request, extra_headers=[(REPLICA_HEADER.encode(), self.replica_id.encode())]):
            yield item

    async def _publish_forever(self) -> None:
        """Every event_interval_s the new KV events, if any; an empty batch every heartbeat_s
        (the replica is alive, its load). Idle, that is one engine-thread call and one actor
        call a second instead of 20."""
        async_engine = self.state.async_engine
        last_published = 0.0
        while True:
            await asyncio.sleep(self.event_interval_s)
            if not self.recorder.has_pending and time.monotonic() - last_published < self.heartbeat_s:
                continue
            try:
                # drained on the engine thread: a snapshot walks the tree, which only that thread changes
                batch = await async_engine.call(self._drain)
                last_published = time.monotonic()
                incarnation = await self.state_actor.publish.remote(batch)
                if incarnation is None:
                    self.recorder.request_snapshot()
                elif incarnation != self.state_incarnation:
                    await self._give_back_state(incarnation)
            except Exception:  # noqa: BLE001 - keep serving; the actor comes back, the next batch is a snapshot
                log.warning("publishing KV events failed", exc_info=True)
                self.recorder.request_snapshot()
                await asyncio.sleep(1.0)

    async def _give_back_state(self, incarnation: str) -> None:
        """ClusterState is new (first publish, or it restarted and lost everything): the routing
        profile and this replica's named caches go back in, so new ingresses route on prefixes
        and every replica still resolves the caches."""
        await self.state_actor.set_profile.remote(self.profile)
        await self.state_actor.restore_caches.remote(self.state.caches.live())
        self.state_incarnation = incarnation

    def _drain(self):
        engine = self.state.engine
        return self.recorder.drain(self.replica_id, len(engine.unfinished_request_ids()), time.time())

    def __del__(self) -> None:
        publisher = getattr(self, "_publisher", None)
        if publisher is not None:
            publisher.cancel()


async def call_asgi(app: Any, request: RoutedRequest, extra_headers: list[tuple[bytes, bytes]] = ()) -> AsyncIterator[Any]:
    """Drive an ASGI app for one request, streaming: first {status, headers, body, more_body} (the
    start message with the first body chunk: a non-streaming response is this one item), then,
    while more body comes, every chunk the app has sent by then as one bytes item (each item is a
    message to the ingress; a fast stream is sent in fewer, larger pieces).
    Closing the generator (the client went away) tells the app the client disconnected."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
        "scheme": "http", "path": request.path, "raw_path": request.path.encode(), "root_path": "",
        "query_string": request.query_string, "headers": list(request.headers),
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80),
    }
    queue: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await queue.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await queue.put(None)

    async def next_chunks() -> tuple[bytes, bool]:
        """(the body sent since the last call, waiting for at least one message; more to come?)"""
        parts, more = [], True
        message = await queue.get()
        while more:
            if message is None:
                more = False
            elif message["type"] == "http.response.body":
                parts.append(bytes(message.get("body", b"")))
                more = message.get("more_body", False)
            if not more or queue.empty():
                break
            message = queue.get_nowait()
        return b"".join(parts), more

    task = asyncio.get_running_loop().create_task(run())
    try:
        start = await queue.get()
        if start is None or start["type"] != "http.response.start":
            await task  # the app failed before answering: its exception, as Ray reports it
            raise RuntimeError("the app ended without a response")
        body, more = await next_chunks()
        yield {"status": start["status"], "headers": list(start.get("headers", [])) + list(extra_headers),
               "body": body, "more_body": more}
        while more:
            body, more = await next_chunks()
            if body:
                yield body
    finally:
        disconnected.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, timeout=5.0)
        if not task.done():
            task.cancel()


async def first_item_unless_client_gone(stream: Any, request: Request | None) -> Any:
    """The engine call's first item, or None when the HTTP client hangs up before it comes. A
    call nobody will read is cancelled, and the replica then aborts its request: a non-streamed
    one answers in its first item, so it would otherwise run to max_tokens for nobody."""
    first = asyncio.ensure_future(stream.__anext__())
    gone = asyncio.ensure_future(_client_gone(request)) if request is not None else None
    try:
        await asyncio.wait([first] if gone is None else [first, gone], return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled (Serve's proxy saw the client go)
        first.cancel()
        stream.cancel()
        raise
    finally:
        if gone is not None:
            gone.cancel()
    if first.done():
        return first.result()  # raises what the call raised (the replica died)
    first.cancel()
    stream.cancel()
    return None


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects; never when a receive fails (that says nothing of the
    client, and the call must not be cancelled for it)."""
    try:
        await wait_for_disconnect(request)
    except Exception:  # noqa: BLE001 - see above
        await asyncio.Event().wait()


def routing_handle(engine: Any) -> Any:
    """A handle to the engine deployment whose router (ours, Ray's) runs on the running event
    loop, the one that serves HTTP, with HANDLE_OPTIONS. Ray Serve otherwise runs every handle's
    router on a loop of its own in another thread (RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP): each
    call and each streamed item then crosses between the two loops, 0.2-0.5 ms of CPU per request
    on the 2-core box. A fresh handle: the one given may already have its router elsewhere."""
    import asyncio

    from ray.serve.handle import DeploymentHandle

    asyncio.get_running_loop()  # raises outside a loop: build the ingress in a startup hook
    handle = DeploymentHandle(engine.deployment_name, engine.app_name)
    handle._init(_run_router_in_separate_loop=False)
    return handle.options(**HANDLE_OPTIONS)


async def response_text(response: Response) -> str:
    """A response's body as text, whether it came whole or streamed. (Above the Ingress class:
    defined after it, the ingress replica raised NameError on it, as Serve ships that class.)"""
    if isinstance(response, StreamingResponse):
        return b"".join([c async for c in response.body_iterator]).decode()
    return bytes(response.body).decode()


class IngressCore:
    """HTTP in, routed calls to the engine deployment out (plain: the Serve Ingress deployment
    and the in-process HTTP ingress, http_ingress_app, both run one)."""

    def __init__(self, engine: Any, server_config: ServerConfig, state_actor_name: str = STATE_ACTOR_NAME) -> None:
        """engine: the engine deployment's handle. Build this on the event loop that serves the
        requests: the handle's router then runs on that loop (routing_handle)."""
        from radixserve.server.auth import Authenticator
        from radixserve.request import CachePolicy

        self.engine = routing_handle(engine)
        self.state_actor = get_or_create_state_actor(state_actor_name)
        self.auth = Authenticator(
            server_config.api_keys, server_config.namespace_from_api_key, admin_keys=server_config.admin_keys,
            metrics_keys=server_config.metrics_keys,
            default_cache_policy=CachePolicy(server_config.default_cache_policy),
        )
        self.profile: RoutingProfile | None = None
        # cache id -> (when looked up, its definition or None): the last NAMED_CACHE_MEMO ids
        self._named_caches: OrderedDict[str, tuple[float, NamedCache | None]] = OrderedDict()

    async def forward(self, request: Request) -> Response:
        body = await request.body()
        # prompt defaults to the path: Ray's PrefixCacheAffinityRouter divides by its length
        routed = RoutedRequest(request.method, request.url.path, request.url.query.encode(),
                               list(request.headers.raw), body, prompt=request.url.path)
        if request.url.path == "/metrics":
            return await self._metrics(routed)
        if request.method == "POST" and body:
            await self._add_hint(routed, request)
        return await self._call(self.engine, routed, request)

    async def _call(self, handle: Any, routed: RoutedRequest, request: Request | None = None) -> Response:
        stream = handle.handle.remote(routed)
        try:
            start = await first_item_unless_client_gone(stream, request)
            if start is None:  # nobody will read the answer; the replica has aborted the request
                return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - a replica died before answering: a clean 503, never a hang
            log.warning("engine replica failed before answering: %s", e)
            return JSONResponse({"error": {"message": f"the engine replica failed: {type(e).__name__}; retry",
                                           "type": "service_unavailable", "code": "replica_unavailable"}},
                                status_code=503, headers={"retry-after": "1"})
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]
                   if k.lower() not in (b"content-length", b"transfer-encoding")}
        if not start["more_body"]:  # the whole response in one item: one message back to the proxy
            return Response(start["body"], status_code=start["status"], headers=headers)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                if start["body"]:
                    yield start["body"]
                async for chunk in stream:
                    yield chunk
            except Exception as e:  # noqa: BLE001 - a replica died mid-stream: end the stream with an error event
                log.warning("engine replica failed mid-response: %s", e)
                if headers.get("content-type", "").startswith("text/event-stream"):
                    yield (b'event: error\ndata: {"error": {"message": "the engine replica failed mid-stream; retry", '
                           b'"type": "service_unavailable"}}\n\n')
            finally:
                stream.cancel()

        return StreamingResponse(chunks(), status_code=start["status"], headers=headers)

    async def _add_hint(self, routed: RoutedRequest, request: Request) -> None:
        if tenant_of(self.auth, request.headers) is None:
            return  # the replica refuses it: no lookups on its behalf
        try:
            profile = await self._profile()
            if profile is None:
                return
            named = await self._prefetch_named_cache(routed.body)
        except Exception:  # noqa: BLE001 - ClusterState unreachable (restarting): route on load alone
            log.warning("no routing hint: the cluster state did not answer", exc_info=True)
            return
        hint_args = (profile, self.auth, routed.path, request.headers, routed.body, named.get)
        if len(routed.body) < INLINE_HINT_BYTES:  # tens of microseconds: cheaper than a thread hop
            routed.prompt, routed.keys = prompt_hint(*hint_args)
        else:  # milliseconds for long prompts: off the event loop
            routed.prompt, routed.keys = await asyncio.to_thread(prompt_hint, *hint_args)

    async def _profile(self) -> RoutingProfile | None:
        if self.profile is None:
            profile = await self.state_actor.get_profile.remote()
            if profile is not None:
                self.profile = dataclasses.replace(profile, tokenizer=PieceMemoTokenizer(profile.tokenizer))
        return self.profile

    async def _prefetch_named_cache(self, body: bytes) -> dict[str, NamedCache]:
        """The named cache a request names (its turns come first in the prompt), cached a few seconds."""
        match = re.search(rb'"cached_content"\s*:\s*"(?:caches/)?([0-9a-f]{1,64})"', body)
        if match is None:
            return {}
        cache_id = match.group(1).decode()
        seen = self._named_caches.get(cache_id)
        if seen is None or time.monotonic() - seen[0] > 5.0:
            seen = self._named_caches[cache_id] = (time.monotonic(), await self.state_actor.get_cache.remote(cache_id))
            if len(self._named_caches) > NAMED_CACHE_MEMO:  # ids are the client's to make up
                self._named_caches.popitem(last=False)
        self._named_caches.move_to_end(cache_id)
        return {cache_id: seen[1]} if seen[1] is not None else {}

    async def _metrics(self, routed: RoutedRequest) -> Response:
        """Every live replica's /metrics (labelled replica="<id>"), then the router's own."""
        stats = await self.state_actor.stats.remote()
        parts = []
        for replica_id in sorted(stats["replicas"]):
            # Our router sends a targeted call to its replica; Ray's routers cannot be told, and
            # the wrong replica answers 404: ask again (pow2 picks at random; prefix-affinity by
            # the prompt text's longest match, hence a fresh text that matches nothing: it then
            # picks the replica with the smallest tree, METRICS_ATTEMPTS) before taking the
            # replica for gone.
            for _ in range(METRICS_ATTEMPTS):
                target = RoutedRequest(routed.method, routed.path, routed.query_string, routed.headers, b"",
                                       prompt=f"{os.urandom(8).hex()}{routed.path}", target_replica=replica_id)
                response = await self._call(self.engine, target)
                if response.status_code != 404:
                    break
                await asyncio.sleep(METRICS_RETRY_PAUSE_S)
            if response.status_code == 404:
                continue  # stopped since it last published
            if response.status_code != 200:
                return response  # e.g. 401 without the metrics key: the replica's answer
            text = await response_text(response)
            parts.append(label_metrics(text, replica_id))
        parts.append(cluster_metrics(stats))
        return Response("".join(parts), media_type="text/plain; version=0.0.4")


METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
# no docs routes of its own: /docs and /openapi.json are the replicas' (keyed when keys are configured)
ingress_app = FastAPI(title="radixserve (replicas)", openapi_url=None, docs_url=None, redoc_url=None)


@serve.ingress(ingress_app)
class Ingress:
    """The ingress as a Serve deployment, behind Serve's HTTP proxy (a Serve config on a cluster)."""

    async def __init__(self, engine: Any, server_config: ServerConfig, state_actor_name: str = STATE_ACTOR_NAME) -> None:
        # async: Serve runs it on the loop that will run the requests, where the handle's router belongs
        self.core = IngressCore(engine, server_config, state_actor_name)

    @ingress_app.api_route("/{path:path}", methods=METHODS)
    async def forward(self, path: str, request: Request) -> Response:
        return await self.core.forward(request)


def http_ingress_app(engine: Any, server_config: ServerConfig, state_actor_name: str = STATE_ACTOR_NAME) -> FastAPI:
    """The ingress as a plain ASGI app for this process's own HTTP server (`radixserve serve
    --replicas`): no Serve proxy and no ingress actor in front of the engine replicas, so a
    request makes one Ray hop (the handle call) instead of three (proxy -> ingress, the body
    fetched back from the proxy, ingress -> replica): docs/scaling.md, "What routing adds"."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # on the server's own loop, before the first request: where the handle's router runs
        app.state.ingress = IngressCore(engine, server_config, state_actor_name)
        try:
            yield
        finally:
            await app.state.ingress.engine.shutdown_async()

    app = FastAPI(title="radixserve (replicas)", openapi_url=None, docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.api_route("/{path:path}", methods=METHODS)
    async def forward(path: str, request: Request) -> Response:
        return await request.app.state.ingress.forward(request)

    return app


def build_app(engine_config: EngineConfig, server_config: ServerConfig, cluster: ClusterConfig):
    """The Serve application with its HTTP ingress (`serve.run(build_app(...))`)."""
    ingress = serve.deployment(Ingress, name="Ingress",
                               max_ongoing_requests=4 * MAX_ONGOING_REQUESTS * cluster.num_engine_replicas,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(build_engine_app(engine_config, server_config, cluster), server_config)


def build_engine_app(engine_config: EngineConfig, server_config: ServerConfig, cluster: ClusterConfig):
    """The engine deployment alone (behind the chosen router): what http_ingress_app calls."""
    kwargs: dict[str, Any] = {}
    if cluster.router == "cache-aware":
        kwargs = {"balance": cluster.router_balance}
    elif cluster.router == "prefix-affinity":
        kwargs = {"imbalanced_threshold": 10}
    router_config = RequestRouterConfig(request_router_class=ROUTERS[cluster.router], request_router_kwargs=kwargs)
    actor_options: dict[str, Any] = {**cluster.replica_resources(), "runtime_env": {"env_vars": REPLICA_ENV_VARS}}
    return serve.deployment(
        EngineReplica, name="Engine", num_replicas=cluster.num_engine_replicas,
        max_ongoing_requests=MAX_ONGOING_REQUESTS, ray_actor_options=actor_options,
        request_router_config=router_config, logging_config=REPLICA_LOGGING,
        health_check_period_s=2, health_check_timeout_s=30,
    ).bind(engine_config, server_config)


def app_builder(args: dict[str, Any]):
    """Entry point of a Serve config file (`import_path: radixserve.cluster.deployments:app_builder`);
    `args` are `radixserve serve` option names (see docs/scaling.md)."""
    from radixserve.cluster.launch import app_from_options

    return app_from_options(args)
