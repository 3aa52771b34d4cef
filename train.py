"""Train a KDAD student on one normal class, then score the validation and test images once.

"Multiresolution Knowledge Distillation for Anomaly Detection" (Salehi et al., CVPR 2021, arXiv 2011.11108),
and the paper's code: the student learns, from normal images only, to reproduce the frozen teacher's
features (distill.py); its failure to do so on a new image is that image's anomaly score.

    python train.py --backbone vit --cls 3                      # the ViT reproduction's recipe, class 3 (cat)
    python train.py --backbone vgg --cls all                    # the paper's VGG16 recipe, ten classes + table
    python train.py --backbone vit --cls cat --teacher dino-vitb16 --data-dir path/to/cifar10-jpeg
    python train.py --backbone vit --cls 3 --image-size 32 --epochs 1 --limit 300    # a quick CPU check

Read top to bottom: the recipes, one training step, one epoch, the fit over all epochs, the final scoring. What
surrounds them lives beside this file: the command line, the jobs (one per class and seed, spread over torchrun's
processes) and the exit codes in jobs.py; resuming, Ctrl-C, the NaN check and the progress bar in steps.py; the
run folder in record.py; the teacher-feature cache in cache.py.
"""
import sys

import cli

if __name__ == "__main__":  # flags first: --help and a mistyped flag answer before torch's 5-second import
    cli.train_args(sys.argv[1:])
    cli.quiet_interrupt()

import torch  # the rest waits for the flag check above

import knn
from cache import feature_cache
from checkpoint import save_tensors
from cli import autocast, grad_scaler
from data import CROP_PCT, NORMAL, Preprocess, batches
from distill import KDAD, channels_last, make_student, place, taps_for
from evaluate import auroc, final_scores, finite, load_student, score_images
from record import Run, Snapshots
from steps import EpochSteps, interruptible, out_of_memory, stops_if_non_finite
from vit import set_fused_attn

## The recipes, per data set and backbone. On CIFAR-10 (and any image folder laid out like it) the VGG one is the
## paper's code (rohban-lab/Knowledge_Distillation_AD) and the ViT one the reproduction's (LucStrater/
## Knowledge_Distillation_AD, vit_kdad.ipynb), with these differences:
## - the reproduction kept the epoch with the best validation AUROC, on a labelled part of the training split (its
##   Lightning checkpoint on `val_roc_auc`); here the final epoch is kept, and --select val-auroc does what it did;
## - it fed its teacher ImageNet mean/std-normalised images (its image processor ran with do_normalize=False);
##   here every teacher gets its own family's normalisation (0.5/0.5 for vit-b16-cifar10, as that model's image
##   processor has it); --teacher-mean 0.485 0.456 0.406 --teacher-std 0.229 0.224 0.225 gives the reproduction's;
## - it resized 32 -> 256 with PIL's Lanczos filter, here antialiased bilinear (on whole batches, data.Preprocess);
## - its validation images were 5,000 drawn at random from the whole training set (random_split), here 10% of each
##   class (data.stratified_split); and it dropped each epoch's last partial batch, here it is trained on.
## On MVTec AD the VGG one is the paper's code with its MVTec settings:
##   configs/config.yaml line 15 (commit 0dbc8c0): `lamda: 0.01 # mvtec:0.5, Others:0.01`
##   configs/config.yaml line 8 (0dbc8c0): `num_epochs: 201 # mnist/fashionmnist:51, cifar10:201, mvtec:601`
##     (counted here as 600, as CIFAR-10's 201 are 200; batch 64 and Adam 1e-3 as for CIFAR-10)
##   configs/config.yaml line 14 (commit 72eab92): `mvtec_img_size: 128`
##   dataloader.py lines 75-78 (0dbc8c0): `transforms.Resize([mvtec_img_size, mvtec_img_size]), transforms.ToTensor()`
##     (the whole image resized, no crop, and no normalisation: VGG16 sees pixels in [0, 1])
## No MVTec recipe exists for the ViT (the reproduction ran CIFAR-10 only): ours keeps the ViT recipe's optimiser and
## the paper's MVTec lambda, sees whole images without augmentation (a flipped part can be a defect), and takes
## batches of 16 for 50 epochs so that a category of a few hundred images gets as many steps as a CIFAR-10 class
## does; a starting point, not tuned on MVTec data.
CIFAR, MVTEC = dict(lam=0.01, image_size=224, crop_pct=CROP_PCT), dict(lam=0.5, crop_pct=1.0)
RECIPES = {
    "cifar10": {
        "vgg": CIFAR | dict(epochs=200, batch_size=64, lr=1e-3, optimizer=torch.optim.Adam, milestones=[], gamma=1.0,
                            augment=False),  # no augmentation: the teacher's features can be computed once and cached
        "vit": CIFAR | dict(epochs=10, batch_size=128, lr=5e-5, optimizer=torch.optim.AdamW, milestones=[5],
                            gamma=0.2, augment=True),  # random crop + flip; AdamW's default weight decay 0.01
    },
    "mvtec": {
        "vgg": MVTEC | dict(epochs=600, batch_size=64, lr=1e-3, optimizer=torch.optim.Adam, milestones=[], gamma=1.0,
                            augment=False, image_size=128, teacher_mean=(0.0,) * 3, teacher_std=(1.0,) * 3),
        "vit": MVTEC | dict(epochs=50, batch_size=16, lr=5e-5, optimizer=torch.optim.AdamW, milestones=[25],
                            gamma=0.2, augment=False, image_size=224),
    },
}


## --------------------------------------------------------------------------------------------------------
## One step, one epoch.

def train_step(kdad: KDAD, opt, amp, scaler, idx, x, cache=None) -> torch.Tensor:
    """One optimiser step on a preprocessed batch x (B, 3, S, S) of training images idx (on the device); with a
    feature cache the teacher's features of those images are read from it instead of computed. Under fp16 the
    scaler multiplies the loss before backward so that small gradients do not flush to zero, and divides them
    again before the step (cli.grad_scaler; for bf16 and fp32 it passes everything through). Returns the loss,
    still on the device (no .item(): a GPU would wait at every step)."""
    with amp():
        teacher_feats = cache.features(idx) if cache else None
        loss = kdad.loss(x, teacher_feats)  # distill.distillation_loss over the training taps
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)  # skipped when a scaled gradient overflowed (inf/NaN)
    scaler.update()   # then a smaller scale; a larger one after a run of good steps
    return loss.detach()


def train_epoch(kdad: KDAD, opt, amp, scaler, steps: EpochSteps, cache=None):
    """One pass over the training images. `steps` yields (image indices, preprocessed batch) and looks after
    resuming, Ctrl-C, the NaN check and the progress bar (steps.py); `cache` holds the teacher's features."""
    kdad.student.train()
    for idx, x in steps:
        steps.log(train_step(kdad, opt, amp, scaler, idx, x, cache))


def epoch_seed(seed: int, epoch: int) -> int:
    """Each epoch's order, augmentation and dropout depend on (seed, epoch) only: a resumed run is the same run."""
    return seed * 100_003 + epoch


def epoch_batches(args, data, prep: Preprocess, epoch: int, first_step: int = 0):
    """The epoch's batches: the training images shuffled and (ViT recipe) randomly cropped and flipped, drawn from
    (seed, epoch); a resumed epoch starts at batch `first_step`."""
    g = torch.Generator().manual_seed(epoch_seed(args.seed, epoch))
    n, device = len(data.train), data.train.device
    order = torch.randperm(n, generator=g).to(device)  # drawn on the CPU, moved once: no copy per step
    aug = (prep.random_augment(n, g) if args.augment else prep.center(n)).to(device)
    skip = first_step * args.batch_size
    return batches(data.train, order[skip:], aug[skip:], args.batch_size, prep, args.plain)


def validate(args, kdad: KDAD, data, prep: Preprocess, amp, val_cache=None) -> dict:
    """End-of-epoch figures: the loss on held-out normal images (no labels needed; their teacher features from
    val_cache when there is one), and, only for --select val-auroc, the validation AUROC (which uses the
    validation images' anomaly labels). Raises evaluate.NonFinite for a diverged student."""
    normal = data.val[data.val_labels == NORMAL]
    loss = score_images(kdad, normal, prep, amp, args.eval_batch_size, train_taps=True, plain=args.plain,
                        cache=val_cache)
    out = {"val_normal_loss": finite(loss, "validation loss").mean().item()}
    if args.select == "val-auroc":
        scores = score_images(kdad, data.val, prep, amp, args.eval_batch_size, plain=args.plain)
        out["val_auroc"] = auroc(scores, data.val_labels.cpu(), "validation scores")
    return out


## --------------------------------------------------------------------------------------------------------
## The fit: every epoch, then the final scoring.

def build(args, teacher, device, precision):
    """Student, KDAD wrapper, preprocessing, autocast, loss scaler, optimiser and schedule of a new run."""
    torch.manual_seed(args.seed)
    student = place(make_student(args.backbone, teacher), device, args.backbone)
    for model in (teacher, student):  # the plain path runs the written-out attention (no effect on VGG)
        set_fused_attn(model, not args.plain)
    kdad = KDAD(teacher, student, taps_for(args.backbone, teacher), args.lam)
    if args.compile:  # compiled wrappers run; the plain modules are what gets saved (no '_orig_mod.' keys)
        kdad.teacher, kdad.student = torch.compile(teacher), torch.compile(student)
    prep = Preprocess(args.image_size, teacher.cfg.mean, teacher.cfg.std, device, channels_last(args.backbone),
                      args.crop_pct)
    # fused on a GPU: one kernel for the whole update, and the fp16 scaler's overflow check stays on the GPU
    opt = args.optimizer(student.parameters(), lr=args.lr, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, args.milestones, args.gamma)
    return student, kdad, prep, autocast(device, precision), grad_scaler(device, precision), opt, sched


def fit(args, data, teacher, device, precision, run: Run, resume: bool) -> dict:
    """Train for args.epochs (continuing run/state.pt if `resume`), then score once (finish); returns the figures
    for results.json. steps.Stop is raised, saying what was kept, on Ctrl-C or non-finite values (the training or
    validation loss, the scores, maps or kNN features)."""
    student, kdad, prep, amp, scaler, opt, sched = build(args, teacher, device, precision)
    snaps = Snapshots(run, student, opt, sched, scaler, device)  # state.pt: weights, optimiser, position, RNG
    if resume:
        snaps.resume(args.epochs)
    cache = val_cache = None  # no augmentation (VGG; ViT on MVTec AD): the frozen teacher's features are computed once
    if not (args.augment or args.no_cache or args.plain):
        cache = feature_cache(kdad, data.train, prep, amp, args.eval_batch_size, device, args.batch_size)
        val_cache = feature_cache(kdad, data.val[data.val_labels == NORMAL], prep, amp, args.eval_batch_size,
                                  device, args.eval_batch_size, "validation")
    with interruptible() as stop, out_of_memory(args, snaps, cache):
        for epoch in range(snaps.state["epoch"], args.epochs):
            snaps.restore_rng(epoch_seed(args.seed, epoch) + 50_000)  # dropout draws the same numbers when resumed
            first = snaps.state["partial"]["step"]
            steps = EpochSteps(epoch_batches(args, data, prep, epoch, first), len(data.train), args, epoch, snaps,
                               stop)
            train_epoch(kdad, opt, amp, scaler, steps, cache)
            with stops_if_non_finite(f"at epoch {epoch + 1}", snaps.kept(False)):  # the epoch is not kept
                record = steps.summary() | {"lr": opt.param_groups[0]["lr"]} | validate(args, kdad, data, prep, amp,
                                                                                       val_cache)
            sched.step()
            snaps.end_epoch(epoch + 1, record)  # log.jsonl and state.pt; best.safetensors for --select val-auroc
            print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {record['loss']:.4f}  val-normal-loss "
                  f"{record['val_normal_loss']:.4f}  {record['images_per_s']:7.1f} img/s"
                  + (f"  val-auroc {record['val_auroc']:.4f}" if "val_auroc" in record else ""))
            stop.after_epoch(epoch + 1, snaps)
    with stops_if_non_finite("in the final scoring", f"the trained state is kept in {snaps.path}, no "
                             f"student.safetensors or results.json written"):
        return finish(args, kdad, student, data, prep, amp, run, snaps.state, cache)


def finish(args, kdad: KDAD, student, data, prep: Preprocess, amp, run: Run, state: dict, cache=None) -> dict:
    """Score validation and test once with the selected student (the final epoch unless --select val-auroc) and
    save it (`student`: the plain module, also under --compile); the teacher-alone kNN baseline and, on MVTec AD,
    the localisation metrics beside."""
    selected = args.epochs
    if args.select == "val-auroc":
        selected = state["best"]["epoch"]
        load_student(run.path / "best.safetensors", student)
        print(f"selected epoch {selected} by validation AUROC (this uses the validation images' anomaly labels)")
    figures, _ = final_scores(kdad, data, prep, amp, args.eval_batch_size, args.knn_k, args.plain, cache)
    history = state["history"]
    images, seconds = sum(r["images"] for r in history), sum(r["seconds"] for r in history)
    results = figures | {"val_normal_loss": history[selected - 1]["val_normal_loss"], "epochs": args.epochs,
                         "selected_epoch": selected, "selection": args.select,
                         "uses_anomaly_labels": args.select == "val-auroc", "train_images": images,
                         "train_seconds": seconds, "train_images_per_s": images / max(seconds, 1e-9)}
    if args.knn_k:
        results["knn_feature"] = knn.feature_name(args.backbone, kdad.teacher)
    save_tensors(student.state_dict(), run.path / "student.safetensors")  # once every figure is finite
    return results


def main(argv=None) -> int:
    """`python train.py ...`: the flags, the jobs (one per class and seed) and the exit codes are jobs.py's."""
    import jobs  # the plumbing around this file imports it
    return jobs.main(argv)


if __name__ == "__main__":
    cli.ready_for_interrupts()
    sys.exit(main())
