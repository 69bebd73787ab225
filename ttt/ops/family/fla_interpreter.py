"""Running fla-core's Triton kernels under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors).

The interpreter executes a kernel as Python on NumPy arrays, which lets the tests check fla's kernels
(not only its pure-PyTorch references) against our chunk form on a machine without a GPU. Three gaps
between what fla's kernels rely on and what the interpreter of Triton 3.9 does stop them; :func:`install`
closes each one for fla's kernels only (functions defined in ``fla.*`` modules), nothing else:

1. **Autotuning.** fla's kernels are ``@triton.autotune``-d over several configurations; the autotuner
   times each one through the GPU driver, and with no GPU Triton raises ``RuntimeError: 0 active
   drivers``. Here an fla autotuner keeps only its first configuration (after fla's own pruning), which
   Triton runs without timing. Block sizes are then the first configuration's, not the GPU's choice.
2. **Loop indices.** Compiled, ``for i in range(n)`` gives ``i`` as a Triton scalar tensor; the
   interpreter runs the loop in Python, so ``i`` is an ``int`` and fla's ``i_t.to(tl.int64)`` raises
   ``AttributeError: 'int' object has no attribute 'to'``. fla's kernels are rewritten (at the
   interpreter's own AST pass) to wrap the index as a scalar tensor at the top of each loop body.
3. **Aliased builtins.** fla binds ``gather = tl.gather`` at import; the interpreter swaps in its own
   ``tl.gather`` only while a kernel runs, so the alias still points to the compiled builtin and raises
   ``ValueError: Did you forget to add @triton.jit ?`` (RWKV7's DPLR kernels). Each such alias in a
   loaded ``fla.*`` module is rebound to look ``tl.<name>`` up at call time.

These touch Triton's interpreter internals (``triton.runtime.interpreter.FunctionRewriter``,
``triton.runtime.autotuner.Autotuner.prune_configs``); :func:`install` raises naming what is missing
if a Triton version lacks them. It changes nothing on CUDA: it is only called for CPU tensors under
``TRITON_INTERPRET=1``, where every Triton kernel runs in the interpreter anyway (and it refuses, in one
line, when fla was imported before ``TRITON_INTERPRET=1`` was set: fla's kernels are then compiled ones).
"""

from __future__ import annotations

import ast
import sys

__all__ = ["install"]

_FLA = "fla."
_installed = False


def _is_fla(fn: object) -> bool:
    return getattr(fn, "__module__", "").startswith(_FLA)


def _loop_index_transformer(base: type) -> ast.NodeTransformer:
    """The interpreter's AST pass (``base``), plus: ``for i in ...:`` starts with ``i = to_tensor(i)``."""

    class LoopIndexAsTensor(base):
        def visit_For(self, node: ast.For) -> ast.For:
            node = self.generic_visit(node)
            if isinstance(node.target, ast.Name) and node.body:
                name = node.target.id
                semantic = ast.Name(id="interpreter_semantic", ctx=ast.Load())
                to_tensor = ast.Attribute(value=semantic, attr="to_tensor", ctx=ast.Load())
                call = ast.Call(
                    func=to_tensor, args=[ast.Name(id=name, ctx=ast.Load()), ast.Constant(False)], keywords=[]
                )
                wrap = ast.Assign(targets=[ast.Name(id=name, ctx=ast.Store())], value=call)
                node.body.insert(0, ast.fix_missing_locations(ast.copy_location(wrap, node.body[0])))
            return node

    return LoopIndexAsTensor()


def rebind_builtin_aliases() -> None:
    """Make every ``name = tl.<builtin>`` alias in a loaded ``fla.*`` module look ``tl.<builtin>`` up
    when called (so the interpreter's version is found while a kernel runs). Idempotent."""
    import triton.language as tl

    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith(_FLA) or module is None:
            continue
        for name, value in list(vars(module).items()):
            builtin = getattr(value, "__name__", "")
            if tl.core.is_builtin(value) and getattr(tl, builtin, None) is value:

                def late(*args, _builtin=builtin, **kwargs):
                    return getattr(tl, _builtin)(*args, **kwargs)

                late.__name__ = builtin
                setattr(module, name, late)


def _check_interpreted() -> None:
    """Raise if fla's kernels were built compiled (fla imported before ``TRITON_INTERPRET=1`` was set)."""
    from fla.ops.utils import op
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(op.exp, InterpretedFunction):
        raise RuntimeError(
            "fla-core was imported before TRITON_INTERPRET=1 was set, so its kernels are compiled ones and "
            "cannot run on CPU tensors; set TRITON_INTERPRET=1 before anything imports fla"
        )


def install() -> None:
    """Close the three gaps above for fla's kernels (once per process), then rebind the builtin
    aliases of the fla modules loaded so far (every call: fla imports its kernel modules lazily)."""
    global _installed
    _check_interpreted()
    if not _installed:
        try:
            from triton.runtime import interpreter
            from triton.runtime.autotuner import Autotuner

            rewriter, base = interpreter.FunctionRewriter, interpreter.ASTTransformer
            transform, prune = rewriter._transform_ast, Autotuner.prune_configs
        except (ImportError, AttributeError) as err:
            raise RuntimeError(
                f"fla's kernels under TRITON_INTERPRET=1 need Triton's interpreter internals "
                f"(FunctionRewriter, ASTTransformer, Autotuner.prune_configs; written for Triton 3.9): {err}"
            ) from err
        loop_pass = _loop_index_transformer(base)

        def transform_ast(self, src):
            if _is_fla(self.fn):
                self.ast_transformer = loop_pass  # this rewriter's instance only
            return transform(self, src)

        def prune_configs(self, kwargs):
            configs = prune(self, kwargs)
            return configs[:1] if _is_fla(self.base_fn) else configs

        rewriter._transform_ast = transform_ast
        Autotuner.prune_configs = prune_configs
        _installed = True
    rebind_builtin_aliases()
