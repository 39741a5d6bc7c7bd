"""A ``DataLoader`` whose worker processes hand a :class:`~vq3d_nerfstudio.errors.Vq3dError` to the
main process as that exception, same class, same one-line message.

torch's own loader re-raises a worker's exception as ``type(err)(whole worker traceback as text)``,
which loses the one line the entry points print. Here the dataset is wrapped so that a worker returns
the error in place of a batch (errors of the family pickle with their message), and the main process
raises it where it would have received that batch.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, default_convert

from vq3d_nerfstudio.errors import Vq3dError


class _Raised:
    """A Vq3dError raised in a worker, travelling to the main process in place of a batch."""

    def __init__(self, error: Vq3dError) -> None:
        self.error = error


class _MapCarrier(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        try:
            return self.dataset[index]
        except Vq3dError as err:
            return _Raised(err)


class _IterableCarrier(IterableDataset):
    def __init__(self, dataset: IterableDataset) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self.dataset
        except Vq3dError as err:
            yield _Raised(err)


class _CarryingCollate:
    """``collate`` on a batch of items, or the batch's first carried error as it is."""

    def __init__(self, collate: Callable) -> None:
        self.collate = collate

    def __call__(self, batch: Any) -> Any:
        if isinstance(batch, _Raised):  # batch_size None: one item, uncollated
            return batch
        raised = next((item for item in batch if isinstance(item, _Raised)), None)
        return raised if raised is not None else self.collate(batch)


class ErrorCarryingLoader(DataLoader):
    """``DataLoader(dataset, **kwargs)``, except that a :class:`~vq3d_nerfstudio.errors.Vq3dError`
    raised by ``dataset`` in a worker (or in this process with ``num_workers=0``) is raised by the
    iteration as the same exception, with its own message. ``kwargs['sampler']`` and the rest are
    torch's; a sampler is built on ``dataset`` itself."""

    def __init__(self, dataset: Dataset, collate_fn: Optional[Callable] = None, **kwargs: Any) -> None:
        carrier = _IterableCarrier(dataset) if isinstance(dataset, IterableDataset) else _MapCarrier(dataset)
        collate_fn = collate_fn or (default_convert if "batch_size" in kwargs and kwargs["batch_size"] is None else default_collate)
        super().__init__(carrier, collate_fn=_CarryingCollate(collate_fn), **kwargs)

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if isinstance(batch, _Raised):
                raise batch.error
            yield batch
