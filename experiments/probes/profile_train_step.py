"""Where a ConvNet training step's time goes, op by op (XLA's own profile of the compiled step).

  python experiments/probes/profile_train_step.py         # 100 images, the CPU lowering's layers
  python experiments/probes/profile_train_step.py --images=256 --top=40
  python experiments/probes/profile_train_step.py --out=experiments/results/profile_train_step.json

Runs --steps SGD steps of the reference ConvNet (as evaluation and the IDM queue run them: one
`lax.scan`, momentum 0.9, no DSA) once under `jax.profiler.trace` and reads the trace back: the
time of every compiled op (an XLA fusion, a matrix product, a concatenation), summed over the
steps and divided by them, with the op's output shape and the jax operation it came from (its
`op_name` metadata: `jvp(ConvNet)/conv1/...` is the forward of the second convolution,
`transpose(...)` its backward; with --fold_norm, the CPU default, the first norm is folded into
`conv0`). bench_train_gemms.py says how far a step is from its matrix products; this says which
ops take the rest.

The ops' times overlap where the runtime runs independent ops at once, and the profiler adds a
little to each, so their sum exceeds the step's wall time (printed beside it, timed without the
profiler). Prints a markdown table of the --top ops and writes --out (JSON: date, jax version,
machine, the step time and every op).
"""

import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from dd_jax import lowering, models
from dd_jax import train as train_lib
from dd_jax.models import kernels

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import timing  # noqa: E402  experiments/timing.py

_IMAGES = flags.DEFINE_integer('images', 100, 'Images per SGD step.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 32, 'Side of the (square, RGB) images.')
_STEPS = flags.DEFINE_integer('steps', 5, 'SGD steps in the profiled call (one lax.scan).')
_CONV_IMPL = flags.DEFINE_enum(
  'conv_impl',
  lowering.CPU.train_conv.impl,
  kernels.CONV_IMPLS,
  "The ConvNet's convolutions (kernels.ConvLowering.impl; default: the CPU lowering's).",
)
_FOLD_NORM = flags.DEFINE_bool(
  'fold_norm',
  lowering.CPU.train_conv.fold_norm,
  'The first norm folded into the first convolution (kernels.ConvLowering.fold_norm; default: '
  "the CPU lowering's).",
)
_MICROBATCH = flags.DEFINE_integer(
  'microbatch',
  None,
  "Images per gradient pass (train.sgd_step; 0: the whole batch; default: the CPU lowering's).",
)
_TOP = flags.DEFINE_integer('top', 25, 'Ops printed (all are written to --out).')
_OUT = flags.DEFINE_string(
  'out',
  os.path.join(tempfile.gettempdir(), 'dd_jax_profile_train_step.json'),
  'Results file (the committed record: --out=experiments/results/profile_train_step.json).',
)

NUM_CLASSES = 10
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.-]+) = (\S+) ([\w-]+)\(')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def scanned_steps(
  images: jax.Array, labels: jax.Array, conv: kernels.ConvLowering, microbatch: int
):
  """(compiled call, its arguments): --steps SGD steps of a fresh ConvNet in one lax.scan."""
  net = models.get_network('ConvNet', NUM_CLASSES, conv=conv)
  variables = net.init(jax.random.key(1), (1, *images.shape[1:]))
  optimizer = optax.sgd(0.01, momentum=0.9)
  opt_state = optimizer.init(variables['params'])

  def steps(variables, opt_state):
    def step(carry, _):
      step = train_lib.sgd_step(net, optimizer, *carry, images, labels, microbatch=microbatch)
      return step[:2], None

    return jax.lax.scan(step, (variables, opt_state), None, _STEPS.value)[0]

  return jax.jit(steps).lower(variables, opt_state).compile(), (variables, opt_state)


def entry_instructions(hlo_text: str) -> dict[str, tuple[str, str, str]]:
  """Instruction name -> (output shape, opcode, jax op_name) over the module's computations."""
  instructions = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      op_name = _OP_NAME.search(line)
      name = op_name.group(1) if op_name else ''
      # The enclosing jit, scan and step are the same for every op (jax 0.10 names the scan
      # body 'while/body/closed_call/', jax 0.12 'while/body/').
      name = re.sub(r'^jit\([^)]*\)/(while/body/(closed_call/)?)*', '', name)
      instructions[match.group(1)] = (match.group(2), match.group(3), name)
  return instructions


def op_times(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
  """(name -> total microseconds, name -> calls) of the complete events in the profile."""
  paths = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
  if not paths:
    raise RuntimeError(f'jax.profiler wrote no trace under {trace_dir}.')
  with gzip.open(paths[0]) as f:
    events = json.load(f)['traceEvents']
  total, calls = collections.Counter(), collections.Counter()
  for event in events:
    if event.get('ph') == 'X':
      total[event['name']] += event['dur']
      calls[event['name']] += 1
  return total, calls


def main(argv):
  del argv
  shape = (_IMAGES.value, _IMAGE_SIZE.value, _IMAGE_SIZE.value, 3)
  images = jax.random.normal(jax.random.key(0), shape)
  labels = jnp.arange(_IMAGES.value) % NUM_CLASSES
  conv = kernels.ConvLowering(_CONV_IMPL.value, fold_norm=_FOLD_NORM.value)
  microbatch = _MICROBATCH.value
  if microbatch is None:
    microbatch = lowering.CPU.microbatch(shape, has_batch_stats=False)  # ConvNet: instance norm
  compiled, args = scanned_steps(images, labels, conv, microbatch)
  jax.block_until_ready(compiled(*args))
  seconds = []
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    seconds.append(time.perf_counter() - start)
  step_ms = 1e3 * statistics.median(seconds) / _STEPS.value
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      jax.block_until_ready(compiled(*args))
    total, calls = op_times(trace_dir)
  instructions = entry_instructions(compiled.as_text())
  ops = []
  for name, microseconds in total.items():
    # Only compiled ops; the loops (whose events span their bodies) and runtime events are not.
    if name not in instructions or instructions[name][1] == 'while':
      continue
    shape_text, opcode, op_name = instructions[name]
    ops.append(
      {
        'op': name,
        'opcode': opcode,
        'shape': shape_text,
        'jax_op': op_name,
        'ms_per_step': microseconds / 1e3 / _STEPS.value,
        'calls_per_step': calls[name] / _STEPS.value,
      }
    )
  if not ops:
    raise RuntimeError('The profile holds no event of a compiled op (a jax version change?).')
  ops.sort(key=lambda op: -op['ms_per_step'])
  ops_ms = sum(op['ms_per_step'] for op in ops)
  results = {
    **timing.environment(),
    'images': _IMAGES.value,
    'image_size': _IMAGE_SIZE.value,
    'conv': timing.conv_text(conv),
    'microbatch': min(microbatch or _IMAGES.value, _IMAGES.value),  # images per pass
    'steps': _STEPS.value,
    'step_ms': step_ms,
    'ops_ms_sum': ops_ms,
    'ops': ops,
  }
  print(
    f'ConvNet SGD step, {shape[0]} images {shape[1]}x{shape[2]}x3, convolutions '
    f'{results["conv"]}, {results["microbatch"]} images per gradient pass: {step_ms:.1f} ms '
    'per step unprofiled; the ops below sum to '
    f'{ops_ms:.1f} ms per step profiled.\n\n'
    '| ms per step | share | op | output | jax operation |\n|---|---|---|---|---|'
  )
  for op in ops[: _TOP.value]:
    print(
      f'| {op["ms_per_step"]:.1f} | {100 * op["ms_per_step"] / ops_ms:.0f}% | {op["op"]} | '
      f'{op["shape"].split("{")[0]} | {op["jax_op"]} |'
    )
  timing.write_results(_OUT.value, results)


if __name__ == '__main__':
  app.run(main)
