"""The mutation catalogue: realistic defects, one or a few lines each, that ``make test`` must catch.

Each mutant is a textual edit of one module of ``ckptio/`` (``before`` occurs exactly once there), the
promise it breaks, and the tests of ``make test`` that fail on it. Weighted to the Guarantees table of
the README and to the sharded, upload and mirror paths. ``tests/mutate.py`` runs them (``make mutate``).

When a refactor moves code, the harness reports the stale ``before`` text as an error: move the mutant
with the code, keeping what it breaks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    id: str
    module: str  # file under ckptio/
    before: str
    after: str
    breaks: str  # the promise the edit breaks
    tests: tuple[str, ...]  # tests of make test that must fail
    equivalent: str | None = None  # why a survivor changes no behaviour, if it survives


T = "tests/"
TRUST, MANAGER, FORMATS, HOSTILE = (
    T + "test_trust.py",
    T + "test_manager.py",
    T + "test_formats.py",
    T + "test_hostile.py",
)
REMOTE, FAULTS, CKPT, EVERYDAY = (
    T + "test_remote.py",
    T + "test_faults.py",
    T + "test_checkpointer.py",
    T + "test_everyday.py",
)
CLI, SHARDED, TORCHRUN, REFERENCE = (
    T + "test_cli.py",
    T + "test_sharded.py",
    T + "test_torchrun.py",
    T + "test_reference.py",
)
RANGES, NODES = T + "test_ranges.py", T + "test_nodes.py"
AGREE = SHARDED + "::test_ranks_that_disagree_fail_together_within_seconds_and_write_nothing[2]"
FAIL_TOGETHER = TORCHRUN + "::test_one_rank_failing_inside_a_collective_operation_stops_every_rank"
MASTER_FAILS = TORCHRUN + "::test_a_failure_on_the_master_during_resume_reaches_every_rank"
RETENTION_BOTH = REMOTE + "::test_uploads_in_background_with_retention_both_sides"
NODE_CACHE = REMOTE + "::test_node_cache_is_keyed_by_version_and_bounded"
SAVE_ORDER = FAULTS + "::test_local_save_order_file_protocol_commit_point_and_retention"
SUPERSEDE = TRUST + "::test_a_resave_while_the_previous_save_uploads_supersedes_it"

MUTANTS: list[Mutant] = [
    # -- layout: one checkpoint's files ------------------------------------------------------------
    Mutant(
        "layout.trainer-state-of-another-save",
        "layout.py",
        "if sidecars.declared and meta.get(SAVE_ID_KEY) != metadata.get(SAVE_ID_KEY):",
        "if sidecars.declared and SAVE_ID_KEY not in meta:",
        "a trainer-state file from another save is resumed from",
        (TRUST + "::test_a_trainer_state_file_from_another_save_is_refused",),
    ),
    Mutant(
        "layout.resave-deletes-sidecars-before-weights",
        "layout.py",
        "stale.sort(key=lambda n: n not in weights)",
        "stale.sort(key=lambda n: n in weights)",
        "a re-save in the other format deletes the old sidecars before the old weights",
        (TRUST + "::test_a_resave_in_the_other_format_deletes_the_old_weights_first",),
    ),
    Mutant(
        "layout.kept-other-format-loses-sidecars",
        "layout.py",
        "keep.update(Sidecars.of(other, read_metadata(storage, other), other).names())",
        "pass",
        "weights kept in the other format lose the sidecars they name (convert beside the source)",
        (TRUST + "::test_a_checkpoint_kept_in_the_other_format_keeps_its_sidecars",),
    ),
    Mutant(
        "layout.delete-weights-last",
        "layout.py",
        """    storage.delete(name)
    names = files_of(name, storage.listdir() if listing is None else listing)
    names.sort(key=lambda n: n not in weights_names(base_of(name)))
    for other in names:
        if other != name:
            storage.delete(other)""",
        """    names = files_of(name, storage.listdir() if listing is None else listing)
    names.sort(key=lambda n: n not in weights_names(base_of(name)))
    for other in names:
        if other != name:
            storage.delete(other)
    storage.delete(name)""",
        "retention deletes sidecars before the weights (a reader sees weights without their metrics)",
        (SAVE_ORDER, FAULTS + "::test_upload_order_weights_last_and_remote_retention_weights_first"),
    ),
    Mutant(
        "layout.copy-not-recognised",
        "layout.py",
        "moved = moved or saved_in != directory_digest(storage)",
        "moved = moved",
        "a copied checkpoint without its sidecars no longer loads",
        (CLI + "::test_a_copied_or_renamed_checkpoint_loads_anywhere_and_export_makes_a_whole_copy",),
    ),
    Mutant(
        "layout.metrics-digest-unchecked",
        "layout.py",
        "if sidecars.metrics_crc32 is not None and crc32_hex(data) != sidecars.metrics_crc32:",
        "if sidecars.metrics_crc32 is not None and not data:",
        "damaged metrics load silently",
        (TRUST + "::test_verify_covers_every_file_of_a_checkpoint", TRUST),
    ),
    Mutant(
        "layout.sidecar-name-leaves-directory",
        "layout.py",
        """("/" in name or "\\\\" in name or name.startswith(".") or not name.endswith(suffix))""",
        """(name.startswith("/") or not name.endswith(suffix))""",
        "a header can point a reader at a sidecar outside the checkpoint's directory",
        (TRUST + "::test_a_header_cannot_name_a_sidecar_outside_its_directory",),
    ),
    Mutant(
        "layout.wrapper-names-kept",
        "layout.py",
        '_WRAPPER_ATOMS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})',
        '_WRAPPER_ATOMS = frozenset({"_orig_mod", "_fsdp_wrapped_module"})',
        "activation checkpointing puts its wrapper's name into saved weight names",
        (CKPT + "::test_wrapped_models_save_and_restore_under_the_unwrapped_names",),
    ),
    Mutant(
        "layout.replaced-meanwhile-called-corrupt",
        "layout.py",
        "if current is None or current.get(SAVE_ID_KEY) != metadata.get(SAVE_ID_KEY):",
        "if current is None:",
        "a checkpoint re-saved while being read is reported damaged instead of re-read",
        (TRUST + "::test_a_reader_never_gets_weights_without_their_metrics",),
    ),
    # -- storage -----------------------------------------------------------------------------------
    Mutant(
        "storage.symlink-to-sibling-with-same-prefix",
        "storage.py",
        'if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):',
        "if real != real_root and not real.startswith(real_root):",
        "a symlink into a sibling directory with the same prefix passes the containment check",
        (HOSTILE + "::test_run_names_and_uris_cannot_write_outside",),
    ),
    Mutant(
        "storage.no-fsync-before-rename",
        "storage.py",
        "                os.fsync(f.fileno())  # the data is on disk before the rename makes it visible",
        "                pass",
        "a file is renamed into place before its data is durable",
        (SAVE_ORDER,),
    ),
    Mutant(
        "storage.no-directory-fsync",
        "storage.py",
        "        fsync_dir(directory)\n    except BaseException:",
        "        pass\n    except BaseException:",
        "a committed rename is not made durable",
        (SAVE_ORDER,),
    ),
    Mutant(
        "storage.write-once-overwrites",
        "storage.py",
        "            os.link(tmp, path)\n            os.unlink(tmp)",
        "            os.replace(tmp, path)",
        "the write-once manifest is overwritten by a racing writer",
        (
            MANAGER + "::test_write_once_is_exclusive",
            T + "test_concurrency.py::test_eight_processes_race_to_create_the_manifest",
        ),
    ),
    Mutant(
        "storage.short-write-dropped",
        "storage.py",
        "if n is None or n >= len(view):",
        "if n is None or n > 0:",
        "a short write is taken as complete (a truncated file committed)",
        (FORMATS + "::test_short_writes_are_continued_not_dropped",),
    ),
    Mutant(
        "storage.live-writers-temporaries-removed",
        "storage.py",
        "if owner.isdigit() and _pid_alive(int(owner)):",
        "if not owner.isdigit():",
        "cleaning removes a live writer's temporary (its background save fails)",
        (MANAGER + "::test_stale_temporaries_ignored_then_cleaned",),
    ),
    Mutant(
        "storage.stale-remote-listing",
        "storage.py",
        "                self.fs.invalidate_cache(self.root)  # a listing must see what other processes wrote since\n",
        "",
        "a remote listing misses what another process wrote since the last listing",
        (REMOTE + "::test_a_remote_listing_sees_what_another_writer_committed_since",),
    ),
    # -- cache -------------------------------------------------------------------------------------
    Mutant(
        "cache.evicts-what-it-just-fetched",
        "cache.py",
        "            if path == keep:\n                continue\n",
        "",
        "a checkpoint larger than the cache limit is evicted as it is fetched",
        (NODE_CACHE, REMOTE + "::test_a_checkpoint_larger_than_the_cache_limit_still_loads"),
    ),
    Mutant(
        "cache.hits-not-recent",
        "cache.py",
        "            os.utime(path)  # recency for LRU eviction\n",
        "",
        "eviction removes the most recently used entry, not the least",
        (NODE_CACHE, REMOTE + "::test_the_node_cache_evicts_the_least_recently_used_entry"),
    ),
    Mutant(
        "cache.key-without-version",
        "cache.py",
        'key = hashlib.sha256(f"{storage.url(name)}\\0{info.version}".encode()).hexdigest()[:24]',
        'key = hashlib.sha256(f"{storage.url(name)}".encode()).hexdigest()[:24]',
        "a changed remote object is served stale from the cache",
        (NODE_CACHE,),
    ),
    # -- formats -----------------------------------------------------------------------------------
    Mutant(
        "formats.header-bound-off-by-one",
        "formats.py",
        "    if n > MAX_HEADER_BYTES:  # what a text file or any other format gives",
        "    if n >= MAX_HEADER_BYTES:  # what a text file or any other format gives",
        "a header of exactly the reference's bound is refused",
        (REFERENCE + "::test_header_bound_is_the_reference_bound",),
    ),
    Mutant(
        "formats.wider-dtypes-misaligned",
        "formats.py",
        "return sorted(tensors, key=lambda k: -tensors[k].element_size())",
        "return list(tensors)",
        "tensors laid out unaligned (loads silently copy instead of mapping)",
        (FORMATS + "::test_keys_keep_state_dict_order_and_tensors_are_aligned",),
    ),
    Mutant(
        "formats.verify-digest-not-chained",
        "formats.py",
        "            self._crc = crc32(view[:take], self._crc)",
        "            self._crc = crc32(view[:take])",
        "a chunk's digest covers only its last read: verify reports files read in smaller pieces corrupt",
        (FORMATS + "::test_digests_span_every_chunk_of_a_large_file",),
    ),
    Mutant(
        "formats.write-digest-not-chained",
        "formats.py",
        "        self.whole = crc32(view, self.whole)",
        "        self.whole = crc32(view)",
        "the file's digest covers only the last piece written of a large file",
        (FORMATS + "::test_digests_span_every_chunk_of_a_large_file",),
    ),
    Mutant(
        "formats.one-byte-truncation-accepted",
        "formats.py",
        "    if pos > data_size:",
        "    if pos > data_size + 1:",
        "a file one byte short is accepted",
        (HOSTILE + "::test_any_truncation_is_refused",),
    ),
    Mutant(
        "formats.data-bytes-lie-accepted",
        "formats.py",
        "if declared is not None and declared != str(pos):",
        "if declared is not None and int(declared) > pos:",
        "metadata claiming fewer data bytes than the header describes is accepted",
        (REFERENCE + "::test_ckptio_metadata_that_contradicts_the_file_is_refused",),
    ),
    Mutant(
        "formats.pickle-trusted-by-default",
        "formats.py",
        'kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": not trusted}',
        'kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": False}',
        "a .pt file is unpickled with full trust by default",
        (HOSTILE + "::test_code_running_pickle_is_refused_and_never_runs",),
    ),
    Mutant(
        "formats.conjugate-view-aliased",
        "formats.py",
        "        t.is_conj(), t.is_neg(),\n",
        "",
        "x and x.conj() are stored as one tensor",
        (TRUST + "::test_strided_conjugate_and_negative_views_save_as_their_values",),
    ),
    Mutant(
        "formats.lazy-tensor-shape-unchecked",
        "formats.py",
        "if t.dtype != self.dtype or tuple(t.shape) != self.shape:",
        "if t.dtype != self.dtype:",
        "a gathered tensor of another shape than its header entry is written",
        (FORMATS + "::test_a_lazy_tensor_that_materializes_differently_is_refused",),
    ),
    Mutant(
        "formats.alias-onto-a-stored-name",
        "formats.py",
        "isinstance(t, str) and t in hdr.entries and a not in hdr.entries for a, t in aliases.items()",
        "isinstance(t, str) and t in hdr.entries for a, t in aliases.items()",
        "an alias that shadows a stored tensor is accepted",
        (REFERENCE + "::test_ckptio_metadata_that_contradicts_the_file_is_refused",),
    ),
    Mutant(
        "formats.gathers-ahead-unbounded",
        "formats.py",
        "                submit_up_to(ahead)  # the next ones gather while this one is written",
        "                submit_up_to(ahead + 8)  # the next ones gather while this one is written",
        "the master gathers more tensors ahead than configured (its RAM is no longer bounded by them)",
        (FORMATS + "::test_lazy_tensors_materialize_ahead_of_the_writer_in_order_and_bounded",),
    ),
    # -- manager: saving and retention ---------------------------------------------------------------
    Mutant(
        "manager.keep-best-strict",
        "manager.py",
        "ranked = best(infos, metric, mode, k, strict=False)",
        "ranked = best(infos, metric, mode, k)",
        "keep_best fails a save when a checkpoint lacks the metric or its metrics are damaged",
        (MANAGER + "::test_keep_best_skips_checkpoints_without_the_metric_or_with_damaged_metrics",),
    ),
    Mutant(
        "manager.last-save-not-kept",
        "manager.py",
        "protected = {*protect, *([self.last_saved] if self.last_saved is not None else [])}",
        "protected = set(protect)",
        "retention deletes the checkpoint this process just saved (a restart in an old run directory)",
        (TRUST + "::test_retention_never_deletes_the_checkpoint_just_written",),
    ),
    Mutant(
        "manager.protect-ignored",
        "manager.py",
        "keep = {infos[-1].name, *protected}",
        "keep = {infos[-1].name}",
        "retention deletes a protected checkpoint",
        (MANAGER + "::test_newest_is_never_pruned_and_protect_holds",),
    ),
    Mutant(
        "manager.legacy-pruned",
        "manager.py",
        "return [i for i in infos if i.name not in keep and not i.legacy]",
        "return [i for i in infos if i.name not in keep]",
        "retention deletes checkpoints other tools wrote",
        (EVERYDAY + "::test_legacy_checkpoints_mix_with_ckptio_ones_and_are_never_written_or_pruned",),
    ),
    Mutant(
        "manager.manifest-of-another-architecture-accepted",
        "manager.py",
        "if not isinstance(existing, dict) or not architectures_equal(existing, arch_json):",
        "if not isinstance(existing, dict):",
        "a job resumes a run created with another architecture",
        (CKPT + "::test_a_run_refuses_another_architecture",),
    ),
    # -- mirror: the remote copy and retention on both sides -------------------------------------------
    Mutant(
        "mirror.last-save-unprotected-remotely",
        "mirror.py",
        "        if self.local.last_saved is not None:  # on the remote too: a restarted run's first save is its newest\n"
        "            keep.add(self.local.last_saved)\n",
        "",
        "remote retention deletes this job's last save (a restart from an earlier epoch)",
        (REMOTE + "::test_remote_retention_keeps_this_jobs_last_save",),
    ),
    Mutant(
        "mirror.remote-resave-keeps-old-files",
        "mirror.py",
        "        remove_replaced(self.remote.storage, job.names[-1], keep=job.names, other_formats=True)\n",
        "",
        "a remote re-save of an epoch keeps the previous save's files",
        (SUPERSEDE, REMOTE + "::test_a_remote_resave_leaves_only_the_new_files"),
    ),
    Mutant(
        "mirror.uploading-files-unprotected",
        "mirror.py",
        "keep = set(self.uploader.in_flight()) if self.uploader is not None else set()",
        "keep: set[str] = set()",
        "local retention deletes a checkpoint still waiting for upload",
        (RETENTION_BOTH, REMOTE + "::test_local_retention_never_deletes_what_is_still_uploading"),
    ),
    Mutant(
        "mirror.resumed-from-kept-forever",
        "mirror.py",
        "            self._resumed_from = None\n",
        "",
        "the checkpoint resumed from is never pruned after a newer one is uploaded",
        (REMOTE + "::test_resumed_checkpoint_survives_until_a_newer_one_is_uploaded",),
    ),
    # -- upload ------------------------------------------------------------------------------------
    Mutant(
        "upload.coalescing-drops-the-newest",
        "upload.py",
        "dropped = self._pending.popleft()",
        "dropped = self._pending.pop()",
        "coalescing drops the newest waiting checkpoint instead of the oldest",
        (REMOTE + "::test_coalescing_skips_the_oldest_waiting_checkpoint",),
    ),
    Mutant(
        "upload.active-not-in-flight",
        "upload.py",
        "return {n for job in (*self._pending, *self._active) for n in job.names}",
        "return {n for job in self._pending for n in job.names}",
        "files under upload are not reported in flight (local retention deletes them mid-upload)",
        (RETENTION_BOTH, REMOTE + "::test_local_retention_never_deletes_what_is_still_uploading"),
    ),
    Mutant(
        "upload.superseded-announced",
        "upload.py",
        "if job.error is None and not job.superseded and self.on_uploaded is not None:",
        "if job.error is None and self.on_uploaded is not None:",
        "on_uploaded fires for an upload a newer save superseded",
        (SUPERSEDE,),
    ),
    Mutant(
        "upload.last-retry-skips-the-file",
        "upload.py",
        "if attempt == self.retries:",
        "if attempt == self.retries - 1 and attempt > 0:",
        "a file whose every attempt failed is skipped silently and the checkpoint counts as uploaded",
        (REMOTE + "::test_an_upload_that_fails_every_attempt_fails_close",),
    ),
    Mutant(
        "upload.close-swallows-failures",
        "upload.py",
        "            t.join()\n        self._raise_if_failed()",
        "            t.join()",
        "close() returns normally although an upload failed for good",
        (REMOTE + "::test_an_upload_that_fails_every_attempt_fails_close",),
    ),
    # -- async_save ----------------------------------------------------------------------------------
    Mutant(
        "async.buffer-reused-across-dtypes",
        "async_save.py",
        "if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:",
        "if buf is None or buf.shape != t.shape:",
        "a background save casts a tensor whose dtype changed into the old buffer",
        (CKPT + "::test_a_background_save_after_a_dtype_change_keeps_the_new_dtype",),
    ),
    Mutant(
        "async.tied-weights-split",
        "async_save.py",
        "            if tie is not None and tie in tied:",
        "            if tie is not None and name in tied:",
        "a background save stores tied weights twice (a file unlike the synchronous one)",
        (CKPT + "::test_a_background_save_writes_the_same_file_as_a_synchronous_one",),
    ),
    Mutant(
        "async.background-failure-lost",
        "async_save.py",
        "            self._error = e\n",
        "            pass\n",
        "a failed background save is never reported",
        (TRUST + "::test_a_failed_save_is_one_error_type_naming_the_checkpoint",),
    ),
    # -- checkpointer --------------------------------------------------------------------------------
    Mutant(
        "layout.background-save-keeps-callers-metrics",
        "layout.py",
        "        if metrics is not None:\n            metrics = json.loads(metrics_payload(metrics, self.checkpoint.base))\n",
        "",
        "a background save writes the caller's metrics dict as it is later, not as it was at save()",
        (CKPT + "::test_a_background_save_writes_the_metrics_as_they_were_at_save",),
    ),
    Mutant(
        "checkpointer.close-raises-only-locally",
        "checkpointer.py",
        "        ranks.raise_together(self._finish())",
        "        error = self._finish()\n        if error is not None:\n            raise error",
        "close() raises only on the rank that failed; the others return as if all went well",
        (FAIL_TOGETHER + "[close]",),
    ),
    Mutant(
        "sharded.master-announces-success-after-failure",
        "sharded.py",
        "                self._gather.finish(ok)",
        "                self._gather.finish(True)",
        "the master tells the other ranks a failed sharded save succeeded",
        (AGREE,),
    ),
    Mutant(
        "checkpointer.sharded-manifest-checked-by-master-alone",
        "checkpointer.py",
        "            self.register()\n            if self._shard_group is None:",
        "            if self.rank.is_master:\n                self._check_manifest()\n            if self._shard_group is None:",
        "a sharded save's manifest check fails on the master alone; the others wait for the shard timeout",
        (AGREE,),
    ),
    Mutant(
        "checkpointer.every-rank-gets-the-masters-rng",
        "checkpointer.py",
        "            restore_rng_state(rng[me])",
        "            restore_rng_state(rng[0])",
        "a resume gives every rank the master's RNG state",
        (TORCHRUN + "::test_sigkill_resume_restores_weights_optimizer_epoch_and_rng",),
    ),
    Mutant(
        "manager.keep-last-off-by-one",
        "manager.py",
        "keep |= {i.name for i in infos[-keep_last:]}",
        "keep |= {i.name for i in infos[-keep_last + 1 :]}",
        "keep_last keeps one checkpoint too few (keep_last=1 keeps everything)",
        (MANAGER + "::test_keep_last_and_keep_best",),
    ),
    # -- ranks ---------------------------------------------------------------------------------------
    Mutant(
        "ranks.raise-before-the-collective",
        "ranks.py",
        "    except Exception as e:\n        error = e\n    if not _distributed():",
        "    except Exception:\n        raise\n    if not _distributed():",
        "a rank that fails raises before joining the collective; the others wait for its timeout",
        (FAIL_TOGETHER + "[load]",),
    ),
    Mutant(
        "ranks.typed-error-lost-in-transit",
        "ranks.py",
        "            pickle.loads(pickle.dumps(error))\n            return error\n",
        "            pickle.loads(pickle.dumps(error))\n",
        "the other ranks raise a generic error, not the failing rank's typed one",
        (MASTER_FAILS, T + "test_torchrun.py::test_manifest_written_once_and_other_architecture_refused"),
    ),
    Mutant(
        "ranks.masters-error-returned-as-a-value",
        "ranks.py",
        '    if outcome[0] == "error":\n        raise outcome[1]\n',
        "",
        "the master's failure reaches the other ranks as a return value",
        (MASTER_FAILS,),
    ),
    Mutant(
        "ranks.every-rank-downloads",
        "ranks.py",
        "        if here:\n            result = fn()",
        "        result = fn()",
        "every rank of a node downloads the checkpoint (a download storm), not the node's first",
        (CKPT + "::test_together_runs_a_step_only_where_asked",),
    ),
    # -- sharded -------------------------------------------------------------------------------------
    Mutant(
        "sharded.placements-not-compared",
        "sharded.py",
        "return (str(t.dtype), tuple(t.shape), tuple(map(str, t.placements)), tuple(t.device_mesh.shape))",
        "return (str(t.dtype), tuple(t.shape))",
        "ranks with other placements of one tensor save it silently wrong",
        (AGREE,),
    ),
    Mutant(
        "sharded.plain-weights-not-compared",
        "sharded.py",
        'if label == "w" or isinstance(t, DTensor)',
        "if isinstance(t, DTensor)",
        "a plain weight that differs on a non-master rank is ignored",
        (AGREE,),
    ),
    Mutant(
        "sharded.abort-taken-as-done",
        "sharded.py",
        "            if i == _ABORT:\n                raise CheckpointSaveError(",
        "            if i == _ABORT:\n                return\n                raise CheckpointSaveError(",
        "a non-master rank returns success from a sharded save the master failed",
        (AGREE,),
    ),
    Mutant(
        "sharded.strided-block-received-in-place",
        "sharded.py",
        "            elif region.is_contiguous():  # a block along the first dimension: straight into place, no copy",
        "            elif True:",
        "a block along another dimension is received into a temporary copy and lost",
        (SHARDED + "::test_tensor_parallel_saves_full_tensors_and_loads_as_a_full_policy_then_shards",),
    ),
    Mutant(
        "sharded.save-initialises-the-optimizer",
        "sharded.py",
        "        _torch_state_dict._init_optim_state = lambda optim: None",
        "        _torch_state_dict._init_optim_state = init",
        "saving a never-stepped optimizer steps it (a save changes training)",
        (CKPT + "::test_saving_a_never_stepped_optimizer_leaves_it_untouched",),
    ),
    Mutant(
        "sharded.optimizer-names-of-the-wrapper",
        "sharded.py",
        "    params = named_parameters(model)\n    state: dict[str, dict[str, Any]] = {}",
        "    params = dict(model.named_parameters())\n    state: dict[str, dict[str, Any]] = {}",
        "optimizer state is looked up by the wrapper's parameter names",
        (CKPT + "::test_wrapped_models_save_and_restore_under_the_unwrapped_names",),
    ),
    Mutant(
        "sharded.shapes-not-compared-on-load",
        "sharded.py",
        "    if missing or unexpected or shapes:",
        "    if missing or unexpected:",
        "load_into a model of other shapes raises torch's error, not one naming the tensors",
        (CKPT + "::test_load_into_checks_every_key_and_shape_and_names_the_differences",),
    ),
    # -- discovery -----------------------------------------------------------------------------------
    Mutant(
        "discovery.pt-preferred-over-safetensors",
        "discovery.py",
        "if key not in chosen or info.rank > chosen[key].rank:",
        "if key not in chosen:",
        "with both formats of an epoch, whichever is listed first wins",
        (MANAGER + "::test_latest_across_formats_by_epoch_not_mtime",),
    ),
    Mutant(
        "discovery.latest-not-retried",
        "discovery.py",
        "            if attempt == LATEST_RETRIES - 1:\n                raise\n    raise AssertionError",
        "            raise\n    raise AssertionError",
        "loading a directory's latest fails when it is pruned between listing and opening",
        (MANAGER + "::test_latest_pruned_between_listing_and_opening_is_listed_again",),
    ),
    Mutant(
        "discovery.bool-metric-ranked",
        "discovery.py",
        "if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):",
        "if not isinstance(value, (int, float)) or math.isnan(value):",
        "a boolean metric is ranked as a number",
        (MANAGER + "::test_best_ignores_non_numeric_metrics_and_breaks_ties_by_newest",),
    ),
    Mutant(
        "discovery.ties-go-to-the-older",
        "discovery.py",
        'key=lambda s: (s[0] if mode == "max" else -s[0], s[1].epoch)',
        'key=lambda s: (s[0] if mode == "max" else -s[0], -s[1].epoch)',
        "equal metrics rank the older checkpoint first",
        (MANAGER + "::test_best_ignores_non_numeric_metrics_and_breaks_ties_by_newest",),
    ),
    # -- artifact, architecture, trainer state -----------------------------------------------------
    Mutant(
        "artifact.instantiate-not-cached",
        "artifact.py",
        "        self._module = module\n",
        "",
        "instantiate builds a new module on every call",
        (T + "test_artifact.py::test_instantiate_is_zero_copy_and_cached",),
    ),
    Mutant(
        "artifact.shapes-unchecked-when-lenient",
        "artifact.py",
        "if shapes or (strict and (missing or unexpected)):",
        "if strict and (shapes or missing or unexpected):",
        "a non-strict instantiate accepts tensors of the wrong shape",
        (T + "test_artifact.py::test_non_strict_tolerates_missing_and_unexpected",),
    ),
    Mutant(
        "architecture.look-alike-prefix-allowed",
        "architecture.py",
        'return any(module == p or module.startswith(p + ".") for p in prefixes)',
        "return any(module.startswith(p) for p in prefixes)",
        "an allow-listed prefix also allows look-alike modules (archs_evil for archs)",
        (HOSTILE + "::test_look_alike_module_prefixes_are_not_allowed",),
    ),
    Mutant(
        "trainer_state.tuples-come-back-as-lists",
        "trainer_state.py",
        'return {"l" if isinstance(x, list) else "u": [enc(v, f"{path}/{i}") for i, v in enumerate(x)]}',
        'return {"l": [enc(v, f"{path}/{i}") for i, v in enumerate(x)]}',
        "trainer state tuples are restored as lists",
        (CKPT + "::test_trainer_state_round_trip_through_safetensors",),
    ),
    Mutant(
        "trainer_state.int-keys-become-strings",
        "trainer_state.py",
        'items.append([k, enc(v, f"{path}/{k}")])',
        'items.append([str(k), enc(v, f"{path}/{k}")])',
        "integer keys (optimizer state by index) are restored as strings",
        (CKPT + "::test_trainer_state_round_trip_through_safetensors",),
    ),
    # -- tools, cli, errors, package -----------------------------------------------------------------
    Mutant(
        "tools.pruned-reported-damaged",
        "tools.py",
        '    if isinstance(error, CheckpointNotFoundError):\n        return VerifyResult(uri, "gone", _GONE)\n',
        "",
        "verify of a live run reports a checkpoint pruned meanwhile as damaged",
        (CLI + "::test_cli_verify_of_a_live_run_reports_pruned_checkpoints_as_gone_not_bad",),
    ),
    Mutant(
        "tools.export-unverified",
        "tools.py",
        "    bad = [r for r in verify_checkpoint(target, leaf) if not r.ok]",
        "    bad: list[VerifyResult] = []",
        "export returns a copy that does not verify",
        (CLI + "::test_an_export_that_does_not_verify_raises",),
    ),
    Mutant(
        "cli.verify-exit-status",
        "cli.py",
        "        return 1 if any(not r.ok for r in results) else 0",
        "        return 0",
        "ckptio verify exits 0 on a damaged checkpoint",
        (CLI + "::test_cli_verify_reports_each_bad_file",),
    ),
    Mutant(
        "errors.errno-dropped",
        "errors.py",
        "        error.errno, error.strerror, error.filename = cause.errno, cause.strerror, cause.filename\n"
        "        error.args = (message,)\n        return error\n    return CheckpointSaveError(message)",
        "        error.args = (message,)\n        return error\n    return CheckpointSaveError(message)",
        "a failed save's OSError loses its errno (ENOSPC handlers stop matching)",
        (TRUST + "::test_a_failed_save_is_one_error_type_naming_the_checkpoint",),
    ),
    Mutant(
        "main.exit-status-dropped",
        "__main__.py",
        "sys.exit(main())",
        "main()",
        "python -m ckptio exits 0 whatever the command found",
        (CLI + "::test_cli_verify_reports_each_bad_file",),
    ),
    Mutant(
        "version.out-of-step",
        "version.py",
        '__version__ = "0.1.0"',
        '__version__ = "0.1.1"',
        "manifests record a version other than the installed package's",
        (CLI + "::test_the_version_is_the_packages",),
    ),
    Mutant(
        "init.allow-list-entry-point",
        "__init__.py",
        "    allow_architecture_modules,\n",
        "",
        "the documented ckptio.allow_architecture_modules is gone",
        (T + "test_artifact.py::test_user_can_extend_allow_list",),
    ),
    # -- partial reads: a node fetches only its ranks' ranges ----------------------------------------
    Mutant(
        "formats.chunks-cross-tensors",
        "formats.py",
        "return [p for begin, end in spans for p in range(begin, end, chunk_bytes)]",
        "return list(range(0, max((e for _, e in spans), default=0), chunk_bytes))",
        "chunks run across tensor boundaries: a node's block rounds out into its neighbours",
        (RANGES + "::test_each_tensor_is_digested_in_chunks_of_its_own_that_the_file_digest_agrees_with",),
    ),
    Mutant(
        "formats.partial-serves-unheld",
        "formats.py",
        "        if not self._holds(begin, end):\n            raise CheckpointError(",
        "        if False:\n            raise CheckpointError(",
        "a partial copy serves bytes that were never fetched",
        (RANGES + "::test_a_partial_copy_reads_only_held_chunks_and_checks_each",),
    ),
    Mutant(
        "formats.partial-unchecked",
        "formats.py",
        "            if i not in self._checked:",
        "            if False:",
        "a partial read is not checked against its chunk digests",
        (RANGES + "::test_a_partial_copy_reads_only_held_chunks_and_checks_each",),
    ),
    Mutant(
        "cache.refetch-held",
        "cache.py",
        "todo = cut_pieces(widen_ranges(subtract_ranges(wanted, held), cuts, size), cuts, size)",
        "todo = cut_pieces(wanted, cuts, size)",
        "a node fetches again the ranges its cache holds",
        (RANGES + "::test_a_partial_cache_entry_fetches_only_what_it_lacks_and_records_only_checked_pieces",),
    ),
    Mutant(
        "cache.unchecked-piece-recorded",
        "cache.py",
        "            if check is not None:\n                check(begin, data)",
        "            if check is not None and begin < 0:\n                check(begin, data)",
        "a piece that fails its digest is cached",
        (RANGES + "::test_a_partial_cache_entry_fetches_only_what_it_lacks_and_records_only_checked_pieces",),
    ),
    Mutant(
        "layout.every-node-wants-everything",
        "layout.py",
        "block = want(label, wanted_as, shape)",
        "block = (0,) * len(shape), tuple(shape)",
        "every node fetches the whole checkpoint",
        (NODES + "::test_the_store_sends_each_byte_once_and_each_node_caches_only_its_ranks_ranges",),
    ),
    Mutant(
        "sharded.resume-reads-another-block",
        "sharded.py",
        "            return tuple(offset), tuple(local_shape)",
        "            return (0,) * len(shape), tuple(local_shape)",
        "a rank asks for another rank's block than the one it loads",
        (NODES + "::test_the_store_sends_each_byte_once_and_each_node_caches_only_its_ranks_ranges",),
    ),
    Mutant(
        "checkpointer.ranges-on-one-node",
        "checkpointer.py",
        "and self.rank.local_world_size < self.rank.world_size",
        "and self.rank.local_world_size <= self.rank.world_size",
        "a single node fetches many ranges rather than one whole download",
        (NODES + "::test_one_node_downloads_each_file_whole_once",),
    ),
    Mutant(
        "sharded.pieces-out-of-order",
        "sharded.py",
        "                    pieces.append(buf)",
        "                    pieces.insert(0, buf)",
        "a tensor's dim-0 blocks are written in another order than its rows",
        (SHARDED + "::test_fsdp2_saves_one_standard_file_and_resumes_at_other_world_sizes",),
    ),
    # -- a resume on several nodes: the store sends each byte once ----------------------------------
    Mutant(
        "node_fetch.store-refetches-held",
        "node_fetch.py",
        "store = merge_ranges(subtract_ranges(lacking, merge_ranges(r for h in held for r in h)), RANGE_GAP)",
        "store = merge_ranges(lacking, RANGE_GAP)",
        "bytes some node's cache holds are asked of the store again",
        (
            RANGES + "::test_the_fetch_plan_brings_each_node_what_it_lacks_from_one_owner_and_asks_the_store_once",
            NODES + "::test_a_node_cache_holding_other_ranges_fetches_only_what_it_lacks",
        ),
    ),
    Mutant(
        "node_fetch.pieces-to-one-node",
        "node_fetch.py",
        "owner = min(range(nodes), key=lambda i: (load[i], i))",
        "owner = 0",
        "one node fetches every piece while the others wait",
        (RANGES + "::test_the_fetch_plan_brings_each_node_what_it_lacks_from_one_owner_and_asks_the_store_once",),
    ),
    Mutant(
        "node_fetch.parts-for-another-node",
        "node_fetch.py",
        "fetchers[n]: [memoryview(data[p])[b - p.begin : e - p.begin] for p, b, e in _parts(owned[me], need, n)]",
        "fetchers[n]: [memoryview(data[p])[b - p.begin : e - p.begin] for p, b, e in _parts(owned[me], need, me)]",
        "a node is sent the parts another node lacks",
        (NODES + "::test_the_store_sends_each_byte_once_and_each_node_caches_only_its_ranks_ranges",),
    ),
    Mutant(
        "cache.received-part-unchecked",
        "cache.py",
        "        for begin, data in parts:\n            check(begin, data)\n",
        "        for begin, data in parts[:0]:\n            check(begin, data)\n",
        "parts received from another node are cached unchecked",
        (RANGES + "::test_a_partial_cache_entry_fetches_only_what_it_lacks_and_records_only_checked_pieces",),
    ),
]
