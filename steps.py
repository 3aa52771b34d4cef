"""What surrounds the training loop without being the method: the progress bar, resuming mid-epoch, Ctrl-C and the
check for a diverged (NaN/inf) loss. train.train_epoch iterates over an EpochSteps and hands it each step's loss.

    with interruptible() as stop:                      # Ctrl-C now asks the loop to stop after the current step
        steps = EpochSteps(batches, n, args, epoch, snaps, stop)
        for idx, x in steps:
            steps.log(train_step(...))                 # the loss, still on the device
        steps.summary()                                # {"epoch", "loss", "images", "seconds", "images_per_s"}

Stop is raised with one line saying what happened and what was kept (record.Snapshots.kept); a GPU running out of
memory while training becomes one line too (out_of_memory).
"""
import signal
import time
from contextlib import contextmanager

import torch

from cli import RunError, progress
from evaluate import NonFinite

CHECK_EVERY = 50  # steps between checks for a non-finite loss (each check waits for the device once)
SHOW_EVERY = 10   # steps between updates of the progress bar's loss (each one waits for the device too)
DIVERGED = "the student diverged: try a lower --lr (in bf16 or fp16, or --precision fp32), with --overwrite"


class Stop(Exception):
    """Training ended early: Ctrl-C, or a non-finite loss. The message says what was kept."""


class Interrupt:
    """Set by Ctrl-C (see interruptible): the loop finishes its step, saves a resumable state and stops."""

    def __init__(self):
        self.requested = False

    def after_epoch(self, epoch: int, snaps):
        """Ctrl-C during an epoch's last step or its validation: the epoch is saved; stop now."""
        if self.requested:
            raise Stop(f"interrupted after epoch {epoch}; {snaps.kept(True)}")


@contextmanager
def interruptible():
    """Inside, Ctrl-C sets the yielded Interrupt's `requested` instead of raising KeyboardInterrupt at an arbitrary
    line; the previous handler is put back on the way out."""
    stop = Interrupt()
    previous = signal.signal(signal.SIGINT, lambda *_: setattr(stop, "requested", True))
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def stops_if_non_finite(when: str, kept: str):
    """Inside, evaluate.NonFinite (NaN/inf in a loss, scores, maps or features) becomes Stop: what, `when`, the
    advice for a diverged student, and what was `kept`."""
    try:
        yield
    except NonFinite as e:
        raise Stop(f"{e} {when} ({DIVERGED}); {kept}") from None


@contextmanager
def out_of_memory(args, snaps, cache=None):
    """Inside, a CUDA out-of-memory error becomes a RunError of one line: the flag to lower and what was kept.
    (Scoring lowers its own batch size instead: evaluate.over_images.)"""
    try:
        yield
    except torch.OutOfMemoryError:
        pass
    else:
        return
    fix = f"lower --batch-size (now {args.batch_size}; a run with another batch size needs --overwrite or another " \
          f"--out)"
    if cache is not None and not cache.on_host:
        fix += f", or add --no-cache (the teacher-feature cache holds {cache.nbytes / 2**30:.1f} GiB of the GPU)"
    raise RunError(f"out of GPU memory while training: {fix}; {snaps.kept(False)}")


class EpochSteps:
    """The batches of one epoch, continuing after the step a resumed epoch stopped at (snaps.state["partial"],
    record.fresh_epoch). Iterating yields (image indices, preprocessed batch); after each step it checks, every
    CHECK_EVERY steps and at the end, that the logged losses are finite, and on Ctrl-C saves the position and raises
    Stop."""

    def __init__(self, batches, n_images: int, args, epoch: int, snaps, stop: Interrupt):
        done = snaps.state["partial"]
        self.batches, self.epoch, self.snaps, self.stop = batches, epoch, snaps, stop
        self.first, self.total = done["step"], -(-n_images // args.batch_size)
        self.desc = f"epoch {epoch + 1}/{args.epochs}"
        self.earlier, self.losses = list(done["losses"]), []  # losses before the resume point, and this session's
        self.seen, self.seconds = done["seen"], done["seconds"]

    def log(self, loss: torch.Tensor):
        self.losses.append(loss)

    def __iter__(self):
        t0 = time.time()
        with progress(self.batches, self.total, self.desc, initial=self.first) as bar:
            for step, (idx, x) in enumerate(bar, start=self.first):
                yield idx, x
                self.seen += len(idx)
                if self.stop.requested or step % CHECK_EVERY == CHECK_EVERY - 1:
                    self.check_finite()
                if step % SHOW_EVERY == 0 or step + 1 == self.total:
                    bar.set_postfix_str(f"loss {self.losses[-1].item():.4f}", refresh=False)
                if self.stop.requested and step + 1 < self.total:
                    bar.n = step + 1  # the bar's last line, written as it closes, counts this step as the message
                    bar.close()
                    self.seconds += time.time() - t0
                    self.snaps.save(self.epoch, {"step": step + 1, "losses": self.all_losses(), "seen": self.seen,
                                                 "seconds": self.seconds})
                    raise Stop(f"interrupted at epoch {self.epoch + 1}, step {step + 1}; {self.snaps.kept(True)}")
        self.seconds += time.time() - t0
        self.check_finite()

    def all_losses(self) -> list[float]:
        return self.earlier + (torch.stack(self.losses).tolist() if self.losses else [])

    def check_finite(self):
        if not self.losses:
            return
        finite = torch.isfinite(torch.stack(self.losses))
        if not finite.all():
            step = self.first + int((~finite).nonzero()[0]) + 1
            raise Stop(f"non-finite loss at epoch {self.epoch + 1}, step {step} ({DIVERGED}); {self.snaps.kept(False)}")

    def summary(self) -> dict:
        """The whole epoch's figures (a resumed epoch's earlier steps included)."""
        losses = self.all_losses()
        return {"epoch": self.epoch + 1, "loss": sum(losses) / max(len(losses), 1), "images": self.seen,
                "seconds": self.seconds, "images_per_s": self.seen / max(self.seconds, 1e-9)}
