"""Rollouts: KV-cache sampler, OpenAI-compatible server and client, multi-turn agent loop."""

from katjax.rollout.agent import AgentLimits, Rollout, run_episode
from katjax.rollout.client import OpenAIClient, ServerError
from katjax.rollout.sampler import Completion, Sampler, SamplingParams
from katjax.rollout.engine import Engine
from katjax.rollout.server import Server, serve

__all__ = ["Sampler", "SamplingParams", "Completion", "serve", "Server", "Engine",
           "OpenAIClient", "ServerError", "run_episode", "AgentLimits", "Rollout"]
