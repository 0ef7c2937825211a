"""Tiny remote-code model packages, written by the tests themselves (the machine is offline).

- `write_internlm2`: a folder laid out as InternLM2 / InternLM2.5 publish theirs: config.json with
  model_type internlm2 and an `auto_map` to configuration_internlm2.py / modeling_internlm2.py in
  the folder, safetensors weights under the published names (fused `wqkv`, `w1`/`w3`/`w2`, ...),
  a sentencepiece tokenizer.model with a slow remote tokenizer class (tokenization_internlm2.py),
  the ChatML specials and the chat template InternLM2-chat publishes. The modeling code below is
  this project's own implementation of the InternLM2 math (RMSNorm, RoPE with dynamic-NTK or
  linear scaling, grouped-query attention from a fused wqkv, SwiGLU), written from the published
  architecture description; it runs under transformers 5 with trust_remote_code=True.
- `write_generic_remote`: a model that is NOT converted by the base stage: a custom architecture
  (model_type `tunepipe_tiny`) subclassing transformers' Qwen2 classes, registered only through
  `auto_map`, with a fast tokenizer whose class also lives in the folder. Loading any part of it
  without trust_remote_code raises.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# in the sentencepiece model (user-defined pieces), and added after its vocabulary
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>"]
AGENT_SPECIALS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>"]

TEXTS = [
    "What is the usual adult dose of paracetamol? Take 500 mg to 1 g every four to six hours, at most 4 g a day.",
    "Can I take ibuprofen with a cold? Yes, for fever and pain, with food; avoid it with stomach ulcers.",
    "头痛三天了，需要看医生吗？如果头痛持续或加重，伴有发热、呕吐，请及时就医。",
    "How should insulin pens be stored?\nUnopened pens in the fridge; the pen in use at room temperature.",
    "def dose(weight_kg):\n    return 15 * weight_kg  # mg, every six hours",
    "You are a careful pharmacist. Answer in one sentence.",
    "Metformin is taken with meals to reduce stomach upset.   Spaces  and\ttabs stay.",
]

CONFIGURATION_INTERNLM2 = '''\
"""InternLM2 configuration (tunepipe test fixture, published key names)."""
from transformers import PretrainedConfig


class InternLM2Config(PretrainedConfig):
    model_type = "internlm2"
    _auto_class = "AutoConfig"

    def __init__(self, vocab_size=103168, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048,
                 initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2, tie_word_embeddings=False, bias=True, rope_theta=10000, rope_scaling=None,
                 attn_implementation="eager", **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.bias = bias
        self.rope_theta = rope_theta
        # transformers 5 turns an attribute named rope_scaling into its own rope_parameters (and
        # renames "type"), so the published settings are kept under a name of their own as well
        self.internlm2_rope_scaling = dict(rope_scaling) if rope_scaling else None
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, attn_implementation=attn_implementation, **kwargs)
'''

MODELING_INTERNLM2 = '''\
"""InternLM2 decoder (tunepipe test fixture): RMSNorm, RoPE (plain, dynamic NTK or linear),
grouped-query attention from one fused wqkv projection, SwiGLU feed-forward. No KV cache."""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_internlm2 import InternLM2Config


class InternLM2RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(config, positions, dtype):
    """cos, sin [batch, 1, seq, head_dim] for integer positions [batch, seq]."""
    head_dim = config.hidden_size // config.num_attention_heads
    base, scale = float(config.rope_theta), 1.0
    scaling = config.internlm2_rope_scaling or {}
    kind = scaling.get("type") or scaling.get("rope_type")
    seq_len = int(positions.max()) + 1
    if kind == "dynamic" and seq_len > config.max_position_embeddings:
        factor = scaling["factor"]
        base = base * ((factor * seq_len / config.max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
    elif kind == "linear":
        scale = 1.0 / scaling["factor"]
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = (positions.float() * scale)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x, cos, sin):
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class InternLM2Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.groups = self.heads // self.kv_heads
        self.head_dim = config.hidden_size // self.heads
        # per KV head: its group of query heads, then its key head, then its value head
        self.wqkv = nn.Linear(config.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=config.bias)
        self.wo = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=config.bias)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        qkv = self.wqkv(x).view(b, t, self.kv_heads, self.groups + 2, self.head_dim)
        q = qkv[:, :, :, :self.groups].reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = qkv[:, :, :, self.groups].transpose(1, 2)
        v = qkv[:, :, :, self.groups + 1].transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k = k.repeat_interleave(self.groups, dim=1)   # query head h*groups+g reads KV head h
        v = v.repeat_interleave(self.groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask
        probs = scores.float().softmax(dim=-1).to(q.dtype)
        return self.wo((probs @ v).transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class InternLM2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)   # gate
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)   # up
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)   # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = InternLM2Attention(config)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLM2Config
    base_model_prefix = "model"
    _no_split_modules = ["InternLM2DecoderLayer"]

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, InternLM2RMSNorm):
            nn.init.ones_(module.weight)


class InternLM2Model(InternLM2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        b, t = input_ids.shape
        x = self.tok_embeddings(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        lowest = torch.finfo(x.dtype).min
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
        mask = torch.zeros(b, 1, t, t, dtype=x.dtype, device=x.device).masked_fill(~allowed, lowest)
        cos, sin = rope_cos_sin(self.config, position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


class InternLM2ForCausalLM(InternLM2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def get_output_embeddings(self):
        return self.output

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs):
        logits = self.output(self.model(input_ids, attention_mask, position_ids)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
'''

TOKENIZATION_INTERNLM2 = '''\
"""InternLM2's slow tokenizer (tunepipe test fixture): sentencepiece on every piece of text
between added tokens, bos first."""
import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class InternLM2Tokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
                 add_bos_token=True, add_eos_token=False, **kwargs):
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        super().__init__(unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                         **kwargs)

    @property
    def vocab_size(self):
        return self.sp_model.get_piece_size()

    def get_vocab(self):
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens):
        return self.sp_model.decode(tokens)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        return out if token_ids_1 is None else out + bos + token_ids_1 + eos

    def save_vocabulary(self, save_directory, filename_prefix=None):
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
'''


def train_sentencepiece(texts: list[str], vocab_size: int = 400, add_dummy_prefix: bool = True) -> bytes:
    """A BPE sentencepiece model with byte fallback, identity normalization (whitespace kept), the
    ChatML pair as user-defined pieces: the shape of InternLM2's tokenizer.model, much smaller."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts * 10), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix, user_defined_symbols=CHATML_SPECIALS, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, split_digits=True, allow_whitespace_only_pieces=True, hard_vocab_limit=False, minloglevel=2)
    return buf.getvalue()


def _special(token: str) -> dict:
    return {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def write_internlm2(folder: Path, *, hidden_size: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    intermediate_size: int = 256, bias: bool = False, rope_scaling: dict | None = None,
                    rope_theta: float = 1000000.0, max_position_embeddings: int = 4096, dtype: str = "float32",
                    add_dummy_prefix: bool = True, seed: int = 0) -> Path:
    """An InternLM2-layout remote-code model folder with random weights (norms too, so that a
    wrong mapping of any tensor shows in the logits)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "configuration_internlm2.py").write_text(CONFIGURATION_INTERNLM2, encoding="utf-8")
    (folder / "modeling_internlm2.py").write_text(MODELING_INTERNLM2, encoding="utf-8")
    (folder / "tokenization_internlm2.py").write_text(TOKENIZATION_INTERNLM2, encoding="utf-8")
    proto = train_sentencepiece(TEXTS, add_dummy_prefix=add_dummy_prefix)
    (folder / "tokenizer.model").write_bytes(proto)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=proto)
    sp_size = sp.get_piece_size()
    vocab_size = sp_size + len(AGENT_SPECIALS)
    added = {**{sp.piece_to_id(t): t for t in ["<unk>", "<s>", "</s>", *CHATML_SPECIALS]},
             **{sp_size + i: t for i, t in enumerate(AGENT_SPECIALS)}}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(i): _special(t) for i, t in added.items()},
        "additional_special_tokens": CHATML_SPECIALS + AGENT_SPECIALS,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
        "chat_template": INTERNLM2_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656, "tokenizer_class": "InternLM2Tokenizer",
    }, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": CHATML_SPECIALS + AGENT_SPECIALS, "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "</s>", "unk_token": "<unk>"}, indent=2), encoding="utf-8")
    config = {
        "architectures": ["InternLM2ForCausalLM"], "attn_implementation": "eager",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "bias": bias, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": hidden_size,
        "initializer_range": 0.02, "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings, "model_type": "internlm2",
        "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv_heads,
        "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": rope_scaling,
        "rope_theta": rope_theta, "tie_word_embeddings": False, "torch_dtype": dtype,
        "transformers_version": "4.41.0", "use_cache": True, "vocab_size": vocab_size,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, sp.piece_to_id(CHATML_SPECIALS[1])], "pad_token_id": 2}, indent=2), encoding="utf-8")

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True),
                                             trust_remote_code=True)
    state = {}
    for name, tensor in model.state_dict().items():
        noise = torch.randn(tensor.shape) * (0.1 if name.endswith("norm.weight") else 0.05)
        state[name] = ((1.0 if name.endswith("norm.weight") else 0.0) + noise).to(getattr(torch, dtype))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


# ------------------------------------------------------------------------------------------------
# a generic remote-code model: not converted, loaded with trust_remote_code by every stage
# ------------------------------------------------------------------------------------------------
GENERIC_CONFIGURATION = '''\
from transformers import Qwen2Config


class TinyConfig(Qwen2Config):
    model_type = "tunepipe_tiny"
'''

GENERIC_MODELING = '''\
from transformers import Qwen2ForCausalLM, Qwen2Model

from .configuration_tiny import TinyConfig


class TinyModel(Qwen2Model):
    config_class = TinyConfig


class TinyForCausalLM(Qwen2ForCausalLM):
    config_class = TinyConfig
'''

GENERIC_TOKENIZATION = '''\
from transformers import PreTrainedTokenizerFast


class TinyTokenizerFast(PreTrainedTokenizerFast):
    """The folder's own tokenizer class: nothing but a name transformers does not know."""
'''


def write_generic_remote(folder: Path, texts: list[str], seed: int = 0) -> Path:
    """A tiny Qwen2-shaped model under model_type `tunepipe_tiny`, known to transformers only
    through the folder's auto_map (config, model and tokenizer classes), with random weights and a
    byte-level BPE tokenizer (ChatML specials and template, as the demo model's) trained on texts."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from stages.base import train_tokenizer
    from stages.common import CHAT_TEMPLATE, END_OF_TEXT, IM_END, IM_START

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "configuration_tiny.py").write_text(GENERIC_CONFIGURATION, encoding="utf-8")
    (folder / "modeling_tiny.py").write_text(GENERIC_MODELING, encoding="utf-8")
    (folder / "tokenization_tiny.py").write_text(GENERIC_TOKENIZATION, encoding="utf-8")
    tokenizer = train_tokenizer(texts, 512)
    tokenizer.save_pretrained(folder)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok_config.pop("extra_special_tokens", None)
    tok_config.update(tokenizer_class="TinyTokenizerFast", chat_template=CHAT_TEMPLATE,
                      additional_special_tokens=[IM_START],
                      auto_map={"AutoTokenizer": [None, "tokenization_tiny.TinyTokenizerFast"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2), encoding="utf-8")

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=False, eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
                         pad_token_id=tokenizer.convert_tokens_to_ids(END_OF_TEXT))
    Qwen2ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    saved.update(model_type="tunepipe_tiny", architectures=["TinyForCausalLM"],
                 auto_map={"AutoConfig": "configuration_tiny.TinyConfig",
                           "AutoModel": "modeling_tiny.TinyModel",
                           "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
    (folder / "config.json").write_text(json.dumps(saved, indent=2), encoding="utf-8")
    return folder
