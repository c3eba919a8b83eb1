"""attention_cpu: the compiled CPU causal attention vs its PyTorch reference and vs torch's SDPA.

The kernel needs a C++ compiler (g++): in CI (`make test` installs it) a missing one fails the
tests; on a developer's laptop they skip. Tolerance: the kernel and the reference sum the same
fp32 products in different orders (blocked GEMMs, online softmax), so the outputs (mixtures of
unit-variance values) differ by a few ulps of 1: atol = rtol = 1e-5.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from rewardserve.kernels import attention_cpu
from rewardserve.kernels.attention_cpu import causal_attention_torch, load_kernel
from tests.conftest import KERNEL_TOOL, attention_kernel_builds, require_tool

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def kernel():
    require_tool(attention_kernel_builds(), KERNEL_TOOL)
    return load_kernel()


@pytest.fixture(scope="module")
def kernel_avx2(tmp_path_factory):
    """The kernel built for AVX2 only (-march=haswell): the path of x86 CPUs without AVX-512, whose
    keys are read in place rather than transposed."""
    require_tool(attention_kernel_builds(), KERNEL_TOOL)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_cpu, "FLAGS", tuple("-march=haswell" if f == "-march=native" else f
                                                 for f in attention_cpu.FLAGS))
        built = load_kernel(cache_dir=tmp_path_factory.mktemp("avx2"))
    assert built is not None
    return built


def _packed(hq: int, hk: int, d: int, lens: list[int], seed: int = 0):
    """q, k, v as row-strided views of one fused (T, (Hq + 2 Hk) D) projection, as the model makes them."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    qkv = torch.randn(T, (hq + 2 * hk) * d, generator=g)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], -1)
    starts = torch.tensor([sum(lens[:i]) for i in range(len(lens))], dtype=torch.int64)
    return q.view(T, hq, d), k.view(T, hk, d), v.view(T, hk, d), starts, torch.tensor(lens)


# (Hq, Hk, D): MHA, GQA 2/4/6, MQA, odd and tiny head dims
HEADS = [(8, 4, 64), (7, 7, 80), (6, 1, 16), (12, 2, 8), (3, 3, 1)]
# 1-token and 2-token sequences, either side of the 64-query block, across the 512-key block
LENGTHS = [[1], [2, 63, 64, 65], [300, 1, 129], [1030, 17], [513]]


@pytest.mark.parametrize("window", [None, 1, 40, 600], ids=lambda w: f"window{w}")
@pytest.mark.parametrize("lens", LENGTHS, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
def test_kernel_matches_reference(kernel, heads, lens, window):
    q, k, v, starts, lens_t = _packed(*heads, lens)
    out = kernel(q, k, v, starts, lens_t, window)
    torch.testing.assert_close(out, causal_attention_torch(q, k, v, starts, lens_t, window), **TOL)


def test_reference_matches_torch_sdpa():
    """The reference itself, against torch's causal SDPA, sequence by sequence."""
    q, k, v, starts, lens = _packed(8, 2, 32, [5, 70, 200])
    ref = causal_attention_torch(q, k, v, starts, lens, None)
    for start, n in zip(starts.tolist(), lens.tolist()):
        rows = slice(start, start + n)
        sdpa = F.scaled_dot_product_attention(*(t[rows].transpose(0, 1)[None] for t in (q, k, v)),
                                              is_causal=True, enable_gqa=True)[0].transpose(0, 1)
        torch.testing.assert_close(ref[rows], sdpa, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [None, 3, 100, 700], ids=lambda w: f"window{w}")
@pytest.mark.parametrize("heads", [(8, 4, 64), (6, 1, 16)], ids=str)
@pytest.mark.parametrize("build", ["native", "avx2"])
def test_responses_attend_to_their_prompt_in_place(request, build, heads, window, dtype):
    """A shared-prompt batch: prompt rows, then responses that read the prompt's keys in place.
    Each response's rows are bit for bit the last rows of its prompt + response run as one whole
    sequence (key blocks sit at the same positions either way), whole or only the selected rows, and
    match the reference; the prompt of 600 tokens crosses a 512-key block."""
    kernel = request.getfixturevalue("kernel" if build == "native" else "kernel_avx2")
    prompt, responses = 600, [1, 64, 130, 7, 480]
    q, k, v, _, _ = (t.to(dtype) for t in _packed(*heads, [prompt, *responses]))
    starts = torch.tensor([0] + [prompt + sum(responses[:i]) for i in range(len(responses))])
    lens = torch.tensor([prompt, *responses])
    pre_starts = torch.zeros(len(lens), dtype=torch.int64)
    pre_lens = torch.tensor([0] + [prompt] * len(responses))
    out = kernel(q, k, v, starts, lens, window, None, pre_starts, pre_lens)
    ref = causal_attention_torch(q.float(), k.float(), v.float(), starts, lens, window, pre_starts, pre_lens)
    torch.testing.assert_close(out.float(), ref, **(TOL if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)))
    for s, (start, n) in enumerate(zip(starts[1:].tolist(), responses), start=1):
        rows = torch.cat([torch.arange(prompt), torch.arange(start, start + n)])
        whole = kernel(q[rows], k[rows], v[rows], torch.tensor([0]), torch.tensor([prompt + n]), window)
        assert torch.equal(out[start:start + n], whole[prompt:])
        last = torch.tensor([n - 1])
        pooled = kernel(q[start + n - 1:start + n], k, v, starts, lens, window, None, pre_starts, pre_lens,
                        select=(torch.tensor([s]), last))
        whole_pooled = kernel(q[rows][-1:], k[rows], v[rows], torch.tensor([0]), torch.tensor([prompt + n]), window,
                              select=(torch.tensor([0]), torch.tensor([prompt + n - 1])))
        assert torch.equal(pooled, whole_pooled)


def test_a_sequence_gets_the_same_output_whatever_else_is_in_the_batch(kernel):
    lens = [700, 3, 130, 64, 1, 900]
    q, k, v, starts, lens_t = _packed(8, 4, 64, lens)
    together = kernel(q, k, v, starts, lens_t, None)
    for i, (start, n) in enumerate(zip(starts.tolist(), lens)):
        rows = slice(start, start + n)
        alone = kernel(q[rows], k[rows], v[rows], torch.tensor([0]), torch.tensor([n]), None)
        torch.testing.assert_close(alone, together[rows], atol=1e-6, rtol=0)
    # the order the sequences are listed in does not matter either
    order = [5, 2, 0, 4, 1, 3]
    shuffled = kernel(q, k, v, starts[order], lens_t[order], None)
    torch.testing.assert_close(shuffled, together, atol=1e-6, rtol=0)


def test_thread_count_does_not_change_the_output(kernel):
    q, k, v, starts, lens = _packed(8, 4, 64, [600, 50, 300])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(q, k, v, starts, lens, None)
        torch.set_num_threads(2)
        two = kernel(q, k, v, starts, lens, None)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, two, atol=1e-6, rtol=0)


def test_contiguous_and_strided_inputs_agree_and_out_rows_outside_sequences_are_left_alone(kernel):
    q, k, v, starts, lens = _packed(4, 2, 16, [10, 20, 30])
    strided = kernel(q, k, v, starts, lens, None)
    plain = kernel(q.contiguous(), k.contiguous(), v.contiguous(), starts, lens, None)
    torch.testing.assert_close(strided, plain, atol=0, rtol=0)
    out = torch.full_like(plain, 7.0)
    kernel(q, k, v, starts[[0, 2]], lens[[0, 2]], None, out=out)  # the middle sequence is someone else's
    assert (out[10:30] == 7.0).all()
    torch.testing.assert_close(out[:10], plain[:10], atol=0, rtol=0)
    torch.testing.assert_close(out[30:], plain[30:], atol=0, rtol=0)


@pytest.mark.parametrize("window", [None, 5, 600], ids=lambda w: f"window{w}")
@pytest.mark.parametrize("heads", [(8, 4, 64), (6, 1, 16), (3, 3, 1)], ids=str)
def test_selected_rows_equal_those_rows_of_the_full_output(kernel, heads, window):
    """The last layer's mode: only some query rows (a segment's last, several of one segment, the first,
    a response's rows after its 600-token prompt), in any order, q and out holding one row each."""
    prompt, lens = 600, [600, 1030, 1, 130, 7, 65]
    q, k, v, starts, lens_t = _packed(*heads, lens)
    pre_starts = torch.zeros(len(lens), dtype=torch.int64)
    pre_lens = torch.tensor([0, 0, 0, prompt, prompt, 0])  # segments 3 and 4 answer segment 0
    full = kernel(q, k, v, starts, lens_t, window, None, pre_starts, pre_lens)
    seg = torch.tensor([1, 2, 3, 1, 4, 0, 5, 1, 3])
    row = torch.tensor([1029, 0, 129, 0, 6, 599, 64, 511, 0])
    packed_rows = starts[seg] + row
    out = kernel(q[packed_rows], k, v, starts, lens_t, window, None, pre_starts, pre_lens, select=(seg, row))
    assert out.shape == (len(seg), heads[0], heads[2])
    torch.testing.assert_close(out, full[packed_rows], **TOL)
    ref = causal_attention_torch(q[packed_rows], k, v, starts, lens_t, window, pre_starts, pre_lens, (seg, row))
    torch.testing.assert_close(out, ref, **TOL)
    # a row's output does not depend on which other rows are selected with it
    alone = kernel(q[packed_rows[:1]], k, v, starts, lens_t, window, None, pre_starts, pre_lens,
                   select=(seg[:1], row[:1]))
    assert torch.equal(alone, out[:1])
    nothing = kernel(q[:0], k, v, starts, lens_t, window, None, pre_starts, pre_lens,
                     select=(seg[:0], row[:0]))
    assert nothing.shape == (0, heads[0], heads[2])


@pytest.mark.parametrize("heads", [(8, 4, 64), (7, 7, 80), (3, 3, 1), (4, 2, 9)], ids=str)
def test_bf16_inputs_are_read_in_place_and_no_less_exact_than_torch_in_bf16(kernel, heads):
    """bf16 q, k, v (strided views, a prompt and its response, a window) need no fp32 copies. With an
    even head dim on a CPU with AVX512-BF16 the products run on bf16 pairs with fp32 sums (the
    probabilities rounded to bf16, as HF's bf16 attention rounds them): the error against fp32 on
    the same values must stay within that of torch's attention run in bf16. Otherwise the kernel
    widens to fp32 and the output is exactly the fp32 kernel's, rounded once."""
    q, k, v, _, _ = _packed(*heads, [300, 70, 1])
    q, k, v = (t.bfloat16() for t in (q, k, v))
    starts, lens = torch.tensor([0, 300, 370]), torch.tensor([300, 70, 1])
    pre_starts, pre_lens = torch.zeros(3, dtype=torch.int64), torch.tensor([0, 300, 0])
    pairs = heads[2] % 2 == 0 and "avx512_bf16" in open("/proc/cpuinfo").read()
    for window in (None, 50):
        got = kernel(q, k, v, starts, lens, window, None, pre_starts, pre_lens)
        assert got.dtype == torch.bfloat16
        want = kernel(q.float(), k.float(), v.float(), starts, lens, window, None, pre_starts, pre_lens)
        if not pairs:
            assert torch.equal(got, want.bfloat16())
            continue
        hf = _attention_as_hf_in_bf16(q, k, v, starts, lens, window, pre_starts, pre_lens)
        ours, theirs = ((x.float() - want).abs().mean().item() for x in (got, hf))
        assert 0 < ours <= theirs, (ours, theirs)


def _attention_as_hf_in_bf16(q, k, v, starts, lens, window, prefix_starts, prefix_lens):
    """What HF's eager attention computes for a bf16 model: q k^T in bf16 (fp32 sums, rounded), the
    scaled scores' softmax in fp32 rounded to bf16, then P v in bf16."""
    out = torch.empty_like(q)
    g = q.shape[1] // k.shape[1]
    for start, n, p_start, p in zip(starts.tolist(), lens.tolist(), prefix_starts.tolist(), prefix_lens.tolist()):
        keys = torch.cat([torch.arange(p_start, p_start + p), torch.arange(start, start + n)])
        qs = q[start:start + n].transpose(0, 1)
        ks, vs = (t[keys].transpose(0, 1).repeat_interleave(g, 0) for t in (k, v))
        qpos, kpos = torch.arange(p, p + n)[:, None], torch.arange(p + n)[None, :]
        allowed = (kpos <= qpos) & ((qpos - kpos < window) if window else True)
        scores = (qs @ ks.transpose(1, 2)) * q.shape[-1] ** -0.5
        probs = scores.masked_fill(~allowed, float("-inf")).float().softmax(-1).to(q.dtype)
        out[start:start + n] = (probs @ vs).transpose(0, 1)
    return out


def test_bad_selections_are_refused_with_their_reason(kernel):
    q, k, v, starts, lens = _packed(4, 2, 8, [5, 3])
    with pytest.raises(ValueError, match="within its segment"):
        kernel(q[:1], k, v, starts, lens, None, select=(torch.tensor([1]), torch.tensor([3])))
    with pytest.raises(ValueError, match="within its segment"):
        kernel(q[:1], k, v, starts, lens, None, select=(torch.tensor([2]), torch.tensor([0])))
    with pytest.raises(ValueError, match="one \\(segment, row\\) per query row"):
        kernel(q[:2], k, v, starts, lens, None, select=(torch.tensor([0]), torch.tensor([0])))


def test_bad_arguments_are_refused_with_their_reason(kernel):
    q, k, v, starts, lens = _packed(6, 4, 8, [5])
    with pytest.raises(ValueError, match="inconsistent shapes"):  # 6 query heads cannot share 4 kv heads
        kernel(q, k, v, starts, lens, None)
    q, k, v, starts, lens = _packed(4, 2, 8, [5])
    with pytest.raises(TypeError, match="fp32 or bf16"):
        kernel(q.half(), k.half(), v.half(), starts, lens, None)
    with pytest.raises(TypeError, match="all three alike"):
        kernel(q.bfloat16(), k, v, starts, lens, None)
    with pytest.raises(ValueError, match="within the packed rows"):
        kernel(q, k, v, starts, torch.tensor([6]), None)
    with pytest.raises(ValueError, match="non-empty"):
        kernel(q, k, v, starts, torch.tensor([0]), None)
    with pytest.raises(ValueError, match="prompt prefix"):
        kernel(q, k, v, starts, torch.tensor([2]), None, None, torch.tensor([3]), torch.tensor([3]))
    with pytest.raises(ValueError, match="one entry per segment"):
        kernel(q, k, v, starts, lens, None, None, torch.tensor([0, 0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="out must be"):
        kernel(q, k, v, starts, lens, None, out=torch.empty(5, 4, 8).transpose(0, 1))


def test_without_a_compiler_the_loader_says_why_and_returns_none(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="rewardserve.kernels.attention_cpu"):
        assert load_kernel(compiler="no-such-compiler-here", cache_dir=tmp_path) is None
    assert "no-such-compiler-here" in caplog.text and "using torch SDPA" in caplog.text


def test_a_failing_build_reports_the_compiler_message_and_leaves_no_file(kernel, tmp_path, monkeypatch):
    broken = tmp_path / "broken.cpp"
    broken.write_text("int f( {\n")
    monkeypatch.setattr(attention_cpu, "SOURCE", broken)
    with pytest.raises(RuntimeError, match="broken.cpp failed: .*error"):
        attention_cpu.build(cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob("*.tmp"))


def test_builds_are_cached_by_source(kernel, tmp_path, monkeypatch):
    first = attention_cpu.build(cache_dir=tmp_path)
    assert attention_cpu.build(cache_dir=tmp_path) == first  # found, not rebuilt
    changed = tmp_path / "changed.cpp"
    changed.write_text(attention_cpu.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(attention_cpu, "SOURCE", changed)
    assert attention_cpu.build(cache_dir=tmp_path) != first


def test_trusted_calls_skip_only_the_checks(kernel):
    """The packed model passes its own plan's tensors with trusted=True: the same bits as a checked
    call, for every row and for a selection."""
    q, k, v, starts, lens = _packed(8, 4, 64, [70, 1, 130])
    pre_starts, pre_lens = torch.zeros(3, dtype=torch.int64), torch.tensor([0, 0, 0])
    checked = kernel(q, k, v, starts, lens, None, None, pre_starts, pre_lens)
    assert torch.equal(kernel(q, k, v, starts, lens, None, None, pre_starts, pre_lens, trusted=True), checked)
    seg, row = torch.tensor([0, 2, 1]), torch.tensor([69, 5, 0])
    rows = starts[seg] + row
    picked = kernel(q[rows], k, v, starts, lens, None, None, pre_starts, pre_lens, select=(seg, row), trusted=True)
    assert torch.equal(picked, checked[rows])
