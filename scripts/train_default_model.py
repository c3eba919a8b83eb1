"""Build the embedded default reward model of rewardserve (service/assets/default-rm).

Pipeline (all local, seeded, CPU-only, no downloads):
  1. generate synthetic, verifiable preference pairs: addition, subtraction, multiplication (1x1, 2x1, 2x2 digits)
     and unit conversions, in many phrasings and answer styles; the correct answer is "chosen", a near miss
     (+-1, +-2, +-10, +-100, swapped digits, wrong operation, carry slip) is "rejected". ~10% of operand pairs,
     and some phrasings and answer styles, never appear in training;
  2. train a byte-level BPE tokenizer with single-digit tokens on generator text and wrap it in a
     PreTrainedTokenizerFast with a chat template;
  3. train a small LlamaForSequenceClassification on exactly the service's rendering (chat template text,
     tokenized without special tokens, right padding, last-token pooling) with the Bradley-Terry loss
     -log sigmoid(r_chosen - r_rejected). Training-only auxiliary heads (see AuxHeads) add dense digit-level
     supervision so arithmetic is learnt within a CPU budget; they are discarded, only the reward model is saved;
  4. evaluate on held-out operands and on held-out phrasings / answer styles, and save model (fp32 safetensors),
     tokenizer and eval.json.

Usage:
    python scripts/train_default_model.py --out service/assets/default-rm [--steps N] [--seed S] [--threads T]
    python scripts/train_default_model.py --readme-table service/assets/default-rm/eval.json
The defaults reproduce the shipped model (8000 steps: about 75 minutes on 2 idle CPU cores; the shipped run took
2 h 9 min of wall time because the machine was shared).
"""
import argparse
import hashlib
import json
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>"
    "{% elif message['role'] == 'assistant' %}<|assistant|>"
    "{% elif message['role'] == 'system' %}<|system|>"
    "{% else %}{{ raise_exception('unsupported role: ' + message['role']) }}{% endif %}"
    "{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CATEGORIES = ["add", "sub", "mul", "mul_2x2", "convert"]

# ----------------------------------------------------------------------------- templates
# Every template family has a "train" part and a "heldout" part that training never sees.
OPS = {"add": (["+"], ["plus"]), "sub": (["-"], ["minus"]),
       "mul": (["*", "x", "×"], ["times", "multiplied by"])}
PHRASINGS = {
    "train": ["What is {a} {op} {b}?", "Compute {a}{sym}{b}.", "Compute {a} {op} {b}.", "{a} {op} {b} = ?",
              "Calculate {a} {op} {b}", "How much is {a} {op} {b}?", "What's {a} {op} {b}?", "Evaluate: {a} {op} {b}",
              "Please work out {a} {op} {b}.", "{a}{sym}{b}?", "Find {a} {op} {b}.", "what is {a}{sym}{b}"],
    "heldout": ["Quick question: {a} {op} {b}?", "Can you tell me what {a} {op} {b} is?", "Solve {a} {op} {b}",
                "I need the value of {a} {op} {b}, please.", "{a} {op} {b} equals what?"],
}
WORD_PHRASINGS = {
    "train": {"add": ["What is the sum of {a} and {b}?", "Add {a} and {b}."],
              "sub": ["Subtract {b} from {a}.", "What is the difference between {a} and {b}?"],
              "mul": ["What is the product of {a} and {b}?", "Multiply {a} by {b}."]},
    "heldout": {"add": ["Tell me the total of {a} and {b}."], "sub": ["Take {b} away from {a}. What is left?"],
                "mul": ["What do you get when you multiply {a} by {b}?"]},
}
CONV_PHRASINGS = {
    "train": ["Convert {v} {src} to {dst}.", "How many {dst} are in {v} {src}?", "{v} {src} is how many {dst}?",
              "What is {v} {src} in {dst}?", "Express {v} {src} in {dst}.", "{v} {src} = ? {dst}"],
    "heldout": ["If I have {v} {src}, how many {dst} is that?", "Turn {v} {src} into {dst}, please.",
                "Could you convert {v} {src} into {dst}?"],
}
STYLES = {
    "train": ["{n}", "{n}.", "The answer is {n}{u}.", "{expr} = {n}{u}", "It's {n}{u}", "That makes {n}{u}",
              "Answer: {n}{u}", "{n}{u}, I believe.", "The result is {n}{u}.", "Sure! {expr} = {n}{u}.",
              "I get {n}{u}.", "It is {n}{u}.", "{n}{u}", "Easy: {n}{u}."],
    "heldout": ["So the total comes to {n}{u}.", "My answer: {n}{u}", "Final answer: {n}{u}!",
                "After working it out, I get {n}{u}.", "{n}{u} is the answer.", "Well, {expr} gives {n}{u}."],
}
# Optional chatter around training prompts and answers, so that operands and the answer are found anywhere in the
# text, not at a fixed offset from its end (held-out templates are never decorated).
FILLERS = {
    "prompt": (["Hi! ", "Hey, ", "Question: ", "Math time. ", "Help me out: ", "Homework: "],
               [" Thanks!", " Answer briefly.", " Just the number.", " I'm stuck.", " Be exact."]),
    "answer": (["Okay. ", "Hmm, ", "Let me see. ", "Sure. "], [" Hope that helps!", " :)", " (checked)", " Done."]),
}
TRAIN_MIX = {"add": 1.0, "sub": 1.0, "mul": 1.0, "mul_2x2": 1.75, "convert": 0.75}  # eval sets stay balanced
# (source unit: singular, plural, abbreviation | target unit: plural, abbreviation, factor, wrong factors, max value)
CONVERSIONS = [
    ("kilometer", "kilometers", "km", "meters", "m", 1000, [100, 10], 99),
    ("meter", "meters", "m", "centimeters", "cm", 100, [10, 1000], 99),
    ("centimeter", "centimeters", "cm", "millimeters", "mm", 10, [100], 99),
    ("kilogram", "kilograms", "kg", "grams", "g", 1000, [100], 99),
    ("liter", "liters", "L", "milliliters", "mL", 1000, [100], 99),
    ("hour", "hours", "h", "minutes", "min", 60, [100, 24], 24),
    ("minute", "minutes", "min", "seconds", "s", 60, [100], 24),
    ("day", "days", "days", "hours", "hours", 24, [12, 60], 12),
    ("week", "weeks", "weeks", "days", "days", 7, [5, 10], 20),
    ("dozen", "dozen", "dozen", "items", "items", 12, [10, 6], 20),
    ("foot", "feet", "ft", "inches", "in", 12, [10], 20),
    ("year", "years", "years", "months", "months", 12, [10], 20),
]


@dataclass
class Problem:
    category: str
    prompt: str
    answer: int
    a: int
    b: int  # second operand, or the conversion factor
    expr: str  # left-hand side used by answer styles, e.g. "37 + 45" or "3 km"
    unit: str  # answer unit suffix (" meters") or ""
    wrong_factors: tuple = ()


# ----------------------------------------------------------------------------- data generation
def is_test_key(category, a, b):
    """Deterministic ~10% operand hold-out (commutative ops keyed on the unordered pair)."""
    if category in ("add", "mul", "mul_2x2"):
        a, b = min(a, b), max(a, b)
    return int(hashlib.md5(f"{category}:{a}:{b}".encode()).hexdigest(), 16) % 100 < 10


def rand_int(rng, digits):
    return rng.randint(1, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def sample_operands(rng, category):
    if category in ("add", "sub"):
        a, b = (rand_int(rng, rng.choice([1, 2, 2, 2, 2])) for _ in range(2))
        return (max(a, b), min(a, b)) if category == "sub" else (a, b)
    if category == "mul":  # mostly 2-digit x 1-digit, some 1x1, random order
        a, b = (rng.randint(10, 99) if rng.random() < 0.8 else rng.randint(2, 9)), rng.randint(2, 9)
        return (a, b) if rng.random() < 0.5 else (b, a)
    if category == "mul_2x2":
        return rng.randint(10, 99), rng.randint(10, 99)
    idx = rng.randrange(len(CONVERSIONS))
    return idx, rng.randint(1, CONVERSIONS[idx][7])


def decorate(rng, text, kind, p=0.25):
    """Randomly wrap a training prompt or answer style in filler text."""
    prefixes, suffixes = FILLERS[kind]
    return (rng.choice(prefixes) if rng.random() < p else "") + text + (rng.choice(suffixes) if rng.random() < p else "")


def make_problem(rng, category, split, phrasing):
    """Sample a problem whose operands lie in `split` ("train"/"test"), phrased from `phrasing`."""
    while True:
        a, b = sample_operands(rng, category)
        if is_test_key(category, a, b) == (split == "test"):
            break
    if category == "convert":
        sing, plur, abbr, dst, dst_abbr, factor, wrong, _ = CONVERSIONS[a]
        src = abbr if rng.random() < 0.3 else (sing if b == 1 else plur)
        dst_name = dst_abbr if rng.random() < 0.2 else dst
        prompt = rng.choice(CONV_PHRASINGS[phrasing]).format(v=b, src=src, dst=dst_name)
        prompt = decorate(rng, prompt, "prompt") if phrasing == "train" else prompt
        return Problem(category, prompt, b * factor, b, factor, f"{b} {src}", " " + dst_name, tuple(wrong))
    op = "mul" if category.startswith("mul") else category
    symbols, words = OPS[op]
    template = rng.choice(PHRASINGS[phrasing] * 2 + WORD_PHRASINGS[phrasing][op])
    sym = rng.choice(symbols)
    prompt = template.format(a=a, b=b, sym=sym, op=rng.choice(symbols + words))
    prompt = decorate(rng, prompt, "prompt") if phrasing == "train" else prompt
    answer = {"add": a + b, "sub": a - b, "mul": a * b}[op]
    return Problem(category, prompt, answer, a, b, f"{a} {sym} {b}", "")


def no_carry(a, b, op):
    """Digit-wise result that ignores carries/borrows (a classic 'off-by-carry' slip)."""
    da, db = str(a)[::-1], str(b)[::-1]
    out = []
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        out.append(str((x + y) % 10 if op == "add" else abs(x - y)))
    return int("".join(reversed(out)))


def near_miss(p, rng):
    """A plausible but wrong answer and its kind: +-1/2/10/100, swapped digits, wrong operation, carry slip."""
    c = p.answer
    while True:
        kind = rng.choice(["pm1", "pm2", "pm10", "pm100", "swap", "wrong_op", "carry"])
        if kind.startswith("pm"):
            w = c + rng.choice([-1, 1]) * int(kind[2:])
        elif kind == "swap":
            s = list(str(c))
            pos = [i for i in range(len(s) - 1) if s[i] != s[i + 1]]
            if not pos:
                continue
            i = rng.choice(pos)
            s[i], s[i + 1] = s[i + 1], s[i]
            w = int("".join(s))
        elif kind == "wrong_op":
            if p.category == "convert":
                w = p.a * rng.choice(p.wrong_factors)
            elif p.category == "add":
                w = rng.choice([p.a * p.b, abs(p.a - p.b)])
            elif p.category == "sub":
                w = p.a + p.b
            else:
                w = rng.choice([p.a + p.b, p.a * (p.b + rng.choice([-1, 1]))])
        elif p.category in ("add", "sub"):
            w = no_carry(p.a, p.b, p.category)
        else:
            w = c + rng.choice([-1, 1]) * rng.choice([10, 100])
        if w >= 0 and w != c:
            return w, kind


class Pair(tuple):
    """A preference pair. Unpacks as (prompt, chosen, rejected, category); .answer (the correct number), .wrong
    (the near miss) and .kind (which near miss) ride along for the auxiliary losses and the report."""

    def __new__(cls, prompt, chosen, rejected, category, answer, wrong, kind):
        pair = super().__new__(cls, (prompt, chosen, rejected, category))
        pair.answer, pair.wrong, pair.kind = answer, wrong, kind
        return pair

    prompt, chosen, rejected, category = (property(lambda self, i=i: self[i]) for i in range(4))


def make_pair(rng, split="train", phrasing="train", styles="train", category=None):
    """One preference pair; chosen/rejected share an answer style 85% of the time."""
    category = category or rng.choices(CATEGORIES, weights=[TRAIN_MIX[c] for c in CATEGORIES])[0]
    p = make_problem(rng, category, split, phrasing)
    wrong, kind = near_miss(p, rng)
    pick = lambda: decorate(rng, rng.choice(STYLES[styles]), "answer") if styles == "train" else rng.choice(STYLES[styles])  # noqa: E731
    s_chosen = pick()
    s_rejected = s_chosen if rng.random() < 0.85 else pick()
    fmt = lambda style, n: style.format(n=n, u=p.unit, expr=p.expr)  # noqa: E731
    return Pair(p.prompt, fmt(s_chosen, p.answer), fmt(s_rejected, wrong), p.category, p.answer, wrong, kind)


# ----------------------------------------------------------------------------- tokenizer
def build_tokenizer(seed, n_texts=20000, vocab_size=1024):
    """Byte-level BPE with single-digit pre-tokenization, trained on training-split generator text."""
    rng = random.Random(seed)
    texts = [t for _ in range(n_texts) for pair in [make_pair(rng)] for t in (pair.prompt, pair.chosen, pair.rejected)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:], chat_template=CHAT_TEMPLATE,
        padding_side="right", model_max_length=512)


def encode(tokenizer, prompts, responses):
    """Exactly the service's rendering: chat template text, then tokenize without special tokens."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": r}],
                                           tokenize=False) for q, r in zip(prompts, responses)]
    return tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")


# ----------------------------------------------------------------------------- model, training, eval
def build_model(tokenizer):
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=192, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        num_labels=1, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    return LlamaForSequenceClassification(cfg)


def score_pairs(model, tokenizer, pairs, hidden_states=False, bf16=False):
    """Chosen then rejected responses in one right-padded batch -> (encoding, model output, r_chosen, r_rejected).
    Training uses bf16 autocast for speed (weights stay fp32); evaluation runs in plain fp32 like the service."""
    enc = encode(tokenizer, [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(**enc, output_hidden_states=hidden_states)
    r = out.logits.float().squeeze(-1)
    return enc, out, r[: len(pairs)], r[len(pairs):]


class AuxHeads(torch.nn.Module):
    """Training-only heads on the backbone's final hidden states (never saved). Tiny models learn arithmetic far
    faster with dense, place-value supervision than from the 1 bit per pair of the Bradley-Terry loss:
      digits: at the prompt's <|assistant|> token, classify each digit of the correct answer (units first);
      match:  at the scored last token, predict per place value whether the response's digit is correct;
      lm:     next-token prediction on the chosen response."""

    PLACES = 6

    def __init__(self, hidden, vocab, assistant_id):
        super().__init__()
        self.assistant_id = assistant_id
        self.digits = torch.nn.Linear(hidden, self.PLACES * 11)
        self.match = torch.nn.Linear(hidden, self.PLACES)
        self.lm = torch.nn.Linear(hidden, vocab, bias=False)

    def place_digits(self, numbers):
        """Units-first digits, 10 = no digit at that place."""
        return torch.tensor([[ord(d) - 48 for d in str(n)[::-1][: self.PLACES].ljust(self.PLACES, ":")] for n in numbers])

    def forward(self, h, enc, pairs):
        n, ids, mask = len(pairs), enc["input_ids"], enc["attention_mask"]
        rows = torch.arange(2 * n)
        truth = self.place_digits([p.answer for p in pairs] * 2)
        given = self.place_digits([p.answer for p in pairs] + [p.wrong for p in pairs])
        at_assistant = h[rows[:n], (ids[:n] == self.assistant_id).int().argmax(1)]
        loss_digits = F.cross_entropy(self.digits(at_assistant).view(-1, 11), truth[:n].reshape(-1))
        loss_match = F.binary_cross_entropy_with_logits(self.match(h[rows, mask.sum(1) - 1]), (truth == given).float())
        in_response = ((ids[:n] == self.assistant_id).cumsum(1) > 0)[:, :-1] & (mask[:n, 1:] == 1)
        loss_lm = F.cross_entropy(self.lm(h[:n, :-1]).transpose(1, 2), ids[:n, 1:].masked_fill(~in_response, -100))
        return loss_digits + loss_match + loss_lm


@torch.no_grad()
def evaluate(model, tokenizer, pairs, batch_size=128):
    """Pairwise accuracy (reward(chosen) > reward(rejected)) overall, per category and per near-miss kind."""
    model.eval()
    groups = {}
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i: i + batch_size]
        _, _, rc, rr = score_pairs(model, tokenizer, batch)
        for p, ok in zip(batch, (rc > rr).tolist()):
            for key in ("overall", p.category, "kind:" + p.kind):
                groups.setdefault(key, []).append(ok)
    model.train()
    return {"n_pairs": len(pairs), **{k: round(sum(v) / len(v), 4) for k, v in groups.items()}}


def eval_sets(seed, per_category):
    """Held-out operands; plus held-out phrasings and/or answer styles (also on held-out operands)."""
    rng = random.Random(seed + 1)
    spec = {"test": ("train", "train"), "heldout_phrasing": ("heldout", "train"),
            "heldout_style": ("train", "heldout"), "heldout_phrasing_and_style": ("heldout", "heldout")}
    return {name: [make_pair(rng, "test", ph, st, cat) for cat in CATEGORIES for _ in range(per_category[name])]
            for name, (ph, st) in spec.items()}


def adamw_cosine(params, lr, steps):
    """AdamW with a linear warmup over the first 5% of steps, then cosine decay to 5% of `lr`."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, steps - warmup))))))
    return opt, sched


def train(model, tokenizer, args, monitor=None):
    """Bradley-Terry training (+ auxiliary heads), AdamW with linear warmup and cosine decay."""
    rng = random.Random(args.seed)
    aux = AuxHeads(model.config.hidden_size, len(tokenizer), tokenizer.convert_tokens_to_ids("<|assistant|>"))
    params = list(model.parameters()) + list(aux.parameters())
    opt, sched = adamw_cosine(params, args.lr, args.steps)
    model.train()
    run_bt = run_aux = 0.0
    run_acc, t0 = 0.5, time.time()
    for step in range(1, args.steps + 1):
        pairs = [make_pair(rng) for _ in range(args.batch_size)]
        enc, out, rc, rr = score_pairs(model, tokenizer, pairs, hidden_states=args.aux > 0, bf16=True)
        loss_bt = -F.logsigmoid(rc - rr).mean()
        loss_aux = aux(out.hidden_states[-1].float(), enc, pairs) if args.aux > 0 else torch.zeros(())
        (loss_bt + args.aux * loss_aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        decay = 0.98 if step > 1 else 0.0
        run_bt = decay * run_bt + (1 - decay) * loss_bt.item()
        run_aux = decay * run_aux + (1 - decay) * loss_aux.item()
        run_acc = decay * run_acc + (1 - decay) * (rc > rr).float().mean().item()
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:5d}/{args.steps}  bt-loss {run_bt:.4f}  aux-loss {run_aux:.3f}  acc {run_acc:.3f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:6.0f}s", flush=True)
        if monitor and args.eval_every and step % args.eval_every == 0:
            print(f"  held-out test: {evaluate(model, tokenizer, monitor)}", flush=True)
    return time.time() - t0


def readme_table(report: dict, count: str = "n_pairs", unit: str = "pairs") -> str:
    """The README's accuracy table, from an eval.json report (`count`: its key of the set sizes)."""
    rows = [("new operands, training phrasings and styles", "test_accuracy"),
            ("held-out phrasings", "heldout_phrasing_accuracy"), ("held-out answer styles", "heldout_style_accuracy"),
            ("held-out phrasings and styles", "heldout_phrasing_and_style_accuracy")]
    lines = [f"| held-out set | overall | add | sub | mul | mul 2x2 | convert | {unit} |", "|---" * 8 + "|"]
    for label, key in rows:
        acc = report[key]
        cells = [f"{100 * acc['overall']:.1f}%"] + [f"{100 * acc[c]:.0f}%" for c in CATEGORIES]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {acc[count]} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="service/assets/default-rm")
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64, help="preference pairs per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--aux", type=float, default=1.0, help="weight of the training-only auxiliary losses (0 = off)")
    ap.add_argument("--eval-every", type=int, default=0, help="monitor held-out test accuracy every N steps")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--readme-table", metavar="EVAL_JSON", help="only print the README's table of this eval.json")
    args = ap.parse_args()
    if args.readme_table:
        print(readme_table(json.loads(Path(args.readme_table).read_text())))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t_start = time.time()

    tokenizer = build_tokenizer(args.seed)
    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}  params {n_params:,}", flush=True)
    per_category = {"test": 400, "heldout_phrasing": 200, "heldout_style": 200, "heldout_phrasing_and_style": 200}
    sets = eval_sets(args.seed, per_category)
    train_seconds = train(model, tokenizer, args, monitor=sets["test"][::8])
    results = {name: evaluate(model, tokenizer, pairs) for name, pairs in sets.items()}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {
        "test_accuracy": results["test"],
        "heldout_phrasing_accuracy": results["heldout_phrasing"],
        "heldout_style_accuracy": results["heldout_style"],
        "heldout_phrasing_and_style_accuracy": results["heldout_phrasing_and_style"],
        "train_pairs": args.steps * args.batch_size, "train_steps": args.steps, "batch_size": args.batch_size,
        "learning_rate": args.lr, "aux_loss_weight": args.aux, "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1), "threads": args.threads,
        "eval_per_category": per_category, "parameters": n_params, "vocab_size": len(tokenizer), "seed": args.seed,
        "loss": "bradley-terry -log sigmoid(r_chosen - r_rejected) + aux_loss_weight * training-only auxiliary "
                "heads (answer digits at <|assistant|>, per-digit correctness at the scored token, response LM)",
        "command": shlex.join(["python"] + sys.argv),
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
