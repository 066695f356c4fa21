"""The facts of every data set rift_dist knows, in one table: :data:`DATASETS`.

One frozen :class:`DatasetSpec` per data set -- class count and names, image size, the sizes of the
full splits, the normalisation statistics, the on-disk layouts it can be read from, and the name and
folders of its common-corruption test set. Every other module reads these facts from here (a unit
test, ``tests/unit/test_data_datasets.py``, fails when a table of data-set facts appears elsewhere).

Sources: CIFAR-10 / CIFAR-100 (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html);
Tiny-ImageNet-200 (the CS231n release: 200 wnids, 500 training and 50 validation images of 64x64
each per class; its official val split is the test split here); CIFAR-10-C / CIFAR-100-C /
Tiny-ImageNet-C (Hendrycks & Dietterich, ICLR 2019); normalisation as in RIFT.md, Models.

This module imports nothing but the error class (``import rift_dist.data.datasets`` is cheap).
"""

from __future__ import annotations

from dataclasses import dataclass

from rift_dist.data.archive import DataError

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR100_CLASSES",
    "DATASETS",
    "DatasetSpec",
    "LAYOUTS",
    "PickleLayout",
    "dataset_spec",
    "spec_for_image_size",
]

CIFAR10_CLASSES: list[str] = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
"""CIFAR-10 class names in label order (Krizhevsky 2009, ``batches.meta``)."""

CIFAR100_CLASSES: list[str] = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "
    "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
    "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
    "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table "
    "tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman "
    "worm"
).split()
"""CIFAR-100 fine class names in label order (``meta`` file's ``fine_label_names``)."""

_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2471, 0.2435, 0.2616)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PickleLayout:
    """The python-pickle release of a CIFAR data set (the "python version" of the download page).

    Attributes:
        directory: the folder the archive unpacks to (``cifar-10-batches-py``).
        train_files, test_files: pickles of each split, concatenated in this order.
        meta_file: the pickle holding the class names.
        label_key: key of the label list in each data pickle (CIFAR-100: the 100 fine labels).
        names_key: key of the class-name list in ``meta_file``.
        detect: a directory holds this layout when all files of ANY of these groups exist in it
            (an incomplete directory is still recognised, so that loading names what is missing).
    """

    directory: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    detect: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything rift_dist assumes about one data set.

    Attributes:
        name: the config name (``data.dataset``), e.g. ``cifar10``.
        title: the name used in reports and papers, e.g. ``CIFAR-10``.
        num_classes: number of classes (the model's output size).
        image_size: side of the square images in pixels (H = W).
        train_size, test_size: images in the full training and test splits of the release
            (Tiny-ImageNet's test split is its official val split); used for cost estimates
            before any data is loaded.
        mean, std: per-channel RGB statistics of the model's input normalisation (pixels in
            [0, 1]). CIFAR-100 uses CIFAR-10's values, as RIFT.md gives one pair for both (its own
            statistics, 0.5071/0.4865/0.4409 and 0.2673/0.2564/0.2762, can be set through
            ``model.mean`` / ``model.std``); Tiny-ImageNet uses ImageNet's.
        classes: class names in label order when the release fixes them (CIFAR); None when they
            are read from the data (Tiny-ImageNet: the sorted wnids of ``wnids.txt``, the order
            of torchvision's ImageFolder). Known names also fix the number of class folders an
            image-folder copy must hold.
        layouts: the ``data.layout`` values this data set can be read from, besides ``auto``,
            in the order auto-detection tries them.
        pickle: the python-pickle release, when there is one.
        corruption_set: name of the common-corruption release (``CIFAR-10-C``); also the
            sub-directory preferred when a corruption root holds several.
        corruption_dirs: other folder names of that release searched under a corruption root.
        corruption_params: the severity constants its corruptions use (a key of
            ``rift_dist.data.corruptions.kernels.SEVERITY_PARAMS``).
        authors_severities: the severities the RiFT authors' code evaluates (microsoft/robustlearn,
            RiFT/dataloader.py: 1..5 for CIFAR-C, severity 1 only for Tiny-ImageNet-C).
    """

    name: str
    title: str
    num_classes: int
    image_size: int
    train_size: int
    test_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: tuple[str, ...] | None
    layouts: tuple[str, ...]
    pickle: PickleLayout | None
    corruption_set: str
    corruption_dirs: tuple[str, ...]
    corruption_params: str
    authors_severities: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.classes)} class names for {self.num_classes} classes")
        if ("pickle" in self.layouts) != (self.pickle is not None):
            raise ValueError(f"{self.name}: the pickle layout needs a PickleLayout, and only then")


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="cifar10",
            title="CIFAR-10",
            num_classes=10,
            image_size=32,
            train_size=50_000,
            test_size=10_000,
            mean=_CIFAR10_MEAN,
            std=_CIFAR10_STD,
            classes=tuple(CIFAR10_CLASSES),
            layouts=("pickle", "folder"),
            pickle=PickleLayout(
                directory="cifar-10-batches-py",
                train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
                test_files=("test_batch",),
                meta_file="batches.meta",
                label_key="labels",
                names_key="label_names",
                detect=(("batches.meta",), ("test_batch",), ("data_batch_1",)),
            ),
            corruption_set="CIFAR-10-C",
            corruption_dirs=(),
            corruption_params="cifar",
            authors_severities=(1, 2, 3, 4, 5),
        ),
        DatasetSpec(
            name="cifar100",
            title="CIFAR-100",
            num_classes=100,
            image_size=32,
            train_size=50_000,
            test_size=10_000,
            mean=_CIFAR10_MEAN,
            std=_CIFAR10_STD,
            classes=tuple(CIFAR100_CLASSES),
            layouts=("pickle", "folder"),
            pickle=PickleLayout(
                directory="cifar-100-python",
                train_files=("train",),
                test_files=("test",),
                meta_file="meta",
                label_key="fine_labels",
                names_key="fine_label_names",
                detect=(("meta", "train"), ("meta", "test")),
            ),
            corruption_set="CIFAR-100-C",
            corruption_dirs=(),
            corruption_params="cifar",
            authors_severities=(1, 2, 3, 4, 5),
        ),
        DatasetSpec(
            name="tiny-imagenet",
            title="Tiny-ImageNet",
            num_classes=200,
            image_size=64,
            train_size=100_000,
            test_size=10_000,
            mean=_IMAGENET_MEAN,
            std=_IMAGENET_STD,
            classes=None,
            layouts=("tiny-imagenet", "folder"),
            pickle=None,
            corruption_set="Tiny-ImageNet-C",
            corruption_dirs=("tiny-imagenet-c", "TinyImageNet-C"),
            corruption_params="tiny-imagenet",
            authors_severities=(1,),
        ),
    )
}
"""Every data set by config name, in the order reports list them."""

LAYOUTS: tuple[str, ...] = ("auto",) + tuple(dict.fromkeys(layout for spec in DATASETS.values() for layout in spec.layouts))
"""Every ``data.layout`` value: auto (detect) and each on-disk layout some data set has (pickle, folder,
tiny-imagenet)."""


def dataset_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of the data set called ``name`` (``data.dataset``).

    Raises:
        DataError: for an unknown name (lists the known ones).
    """
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)} (data.dataset)") from None


def spec_for_image_size(height: int, width: int) -> DatasetSpec | None:
    """The first data set (in table order) whose images are ``height`` x ``width`` pixels, or None."""
    if height != width:
        return None
    return next((spec for spec in DATASETS.values() if spec.image_size == height), None)
