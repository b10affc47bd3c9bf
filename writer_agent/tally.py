"""What the images a request forwarded were (ImageMetadata statuses, image id jumps), and how a final status
says so. Pure logic, on the agent's per-image path."""
from __future__ import annotations

from typing import Mapping

# ImageMetadata.status 0..3 (design document §4), counted under the names std_assembler's counters use;
# any other value (none is defined) goes to "images_other_status".
STATUS_FIELDS = ("images_good", "images_missing_packets", "images_mismatch", "images_missing_module")
TALLY_FIELDS = (*STATUS_FIELDS, "images_other_status", "images_incomplete", "image_id_gaps", "image_ids_skipped",
                "image_id_backward_jumps")


class ImageTally:
    """What the images a request forwarded to std_h5_writer were: how many of each ImageMetadata status,
    and the jumps in their ids, in the order they were forwarded (the order of the file's rows).

    Ids of Jungfrau, Eiger and Gigafrost are frame counters, consecutive within a run of the detector, and
    std_assembler publishes a run's ids in rising order; so a step of more than one is images the detector
    counted that the file does not hold (they never reached the ImageBuffer: a receiver or the assembler
    restarting; or the detector skipped them). Images the agent itself lost are not among those skips,
    since they are reported apart: `add` takes the number of images it missed just before this one
    (sequence gaps), which are taken off the step, and `passed` notes the id of an image it could not
    hand to std_h5_writer (images_dropped) without counting it. A step to an id not above the previous
    one is not a skip: the detector restarted (its counter began again) or an id repeated; it is counted in
    `image_id_backward_jumps`, and counting goes on from the new id. `add` is the agent's per-image path:
    two list increments and an integer comparison.

    `totals`, if given, is the agent's tally over all requests, counted along (its own `add` is never
    called: a jump between two requests' images is none of theirs)."""

    __slots__ = ("statuses", "last_id", "gaps", "skipped", "backward", "totals")

    def __init__(self, totals: ImageTally | None = None) -> None:
        self.statuses = [0] * (len(STATUS_FIELDS) + 1)  # the last one: any other status value
        self.last_id: int | None = None
        self.gaps = self.skipped = self.backward = 0
        self.totals = totals

    def add(self, image_id: int, status: int, missed: int = 0) -> None:
        """An image forwarded; `missed`: how many images the agent missed right before it (a sequence gap)."""
        i = status if status < len(STATUS_FIELDS) else -1
        self.statuses[i] += 1
        if self.totals is not None:
            self.totals.statuses[i] += 1
        last, self.last_id = self.last_id, image_id
        if last is not None and image_id != last + 1:
            self._jump(image_id - last, missed)

    def passed(self, image_id: int) -> None:
        """An image that reached the agent and was not forwarded (counted in images_dropped): the next
        step is measured from it, so it is no skip of the detector's."""
        self.last_id = image_id

    def _jump(self, step: int, missed: int) -> None:
        tallies = (self,) if self.totals is None else (self, self.totals)
        if step < 1:
            for tally in tallies:
                tally.backward += 1
            return
        skipped = step - 1 - missed  # the ids the agent's own misses do not explain
        if skipped > 0:
            for tally in tallies:
                tally.gaps += 1
                tally.skipped += skipped

    def counts(self) -> dict[str, int]:
        """The TALLY_FIELDS, as they go into the request's summary."""
        out = dict(zip((*STATUS_FIELDS, "images_other_status"), self.statuses))
        out["images_incomplete"] = sum(self.statuses) - self.statuses[0]
        out["image_id_gaps"], out["image_ids_skipped"] = self.gaps, self.skipped
        out["image_id_backward_jumps"] = self.backward
        return out


def describe_tally(counts: Mapping[str, int], n_images: int, skips_expected: bool) -> list[str]:
    """Phrases for what is wrong in a tally's counts (none when nothing is): skipped ids (left out when
    `skips_expected`: pulse ids as image ids, where a reduced rate skips ids by design), ids going back,
    incomplete images."""
    out = []
    if counts["image_ids_skipped"] and not skips_expected:
        gaps = counts["image_id_gaps"]
        out.append(f"{counts['image_ids_skipped']} image ids skipped in {gaps} gap{'s' if gaps != 1 else ''} "
                   "(images the detector counted that never reached the ImageBuffer, or that it skipped)")
    if counts["image_id_backward_jumps"]:
        out.append(f"the image id went back {counts['image_id_backward_jumps']} time(s) (a detector restart?)")
    if counts["images_incomplete"]:
        kinds = ", ".join(f"{counts[name]} {name[len('images_'):].replace('_', ' ')}"
                          for name in (*STATUS_FIELDS[1:], "images_other_status") if counts[name])
        out.append(f"{counts['images_incomplete']} of {n_images} images incomplete ({kinds})")
    return out
