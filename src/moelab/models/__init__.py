"""moelab's model architectures (dense, MoE, Arctic hybrid, PR-MoE) as transformers models."""

from transformers import AutoConfig, AutoModelForCausalLM

from moelab.models.build import build_model
from moelab.models.configuration import MoelabLMConfig
from moelab.models.modeling import MoelabCausalLMOutput, MoelabForCausalLM

AutoConfig.register(MoelabLMConfig.model_type, MoelabLMConfig, exist_ok=True)
AutoModelForCausalLM.register(MoelabLMConfig, MoelabForCausalLM, exist_ok=True)

__all__ = ["MoelabCausalLMOutput", "MoelabForCausalLM", "MoelabLMConfig", "build_model"]
