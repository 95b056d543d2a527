"""Prompt-cache advisor: replay a request log through the prefix cache and say what to change.

    from radixserve.advisor import AdvisorConfig, analyze, load_model_info, read_log

    model = load_model_info("embedded")
    log = read_log("requests.jsonl", model.tokenizer)
    report = analyze(log.requests, model, AdvisorConfig(capacity_tokens=65536), log=log)
    print(report.render_text())

Modules: logs (reading + rendering + tokenizing the log that radixserve/request_log.py writes),
replay (the engine's KVCacheManager over a log), curve (capacity curve), findings (cache-hostile
patterns), prefix_tree (the shared-prefix tree), report (text and JSON), plot (the PNG).
"""

from radixserve.advisor.analyze import AdvisorConfig, analyze
from radixserve.advisor.logs import LoadedLog, PromptRequest, read_log, requests_from_bodies
from radixserve.advisor.model_info import ModelInfo, load_model_info, model_info_from_loaded
from radixserve.advisor.replay import ReplayConfig, ReplayResult, replay
from radixserve.advisor.report import AdviceReport
from radixserve.request_log import RequestLogWriter

__all__ = [
    "AdviceReport",
    "AdvisorConfig",
    "LoadedLog",
    "ModelInfo",
    "PromptRequest",
    "ReplayConfig",
    "ReplayResult",
    "RequestLogWriter",
    "analyze",
    "load_model_info",
    "model_info_from_loaded",
    "read_log",
    "replay",
    "requests_from_bodies",
]
