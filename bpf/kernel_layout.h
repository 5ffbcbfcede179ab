/* SPDX-License-Identifier: GPL-2.0 */
/*
 * How the iobridge BPF programs read kernel structs without including
 * kernel headers: BCC parses every header a program includes on every
 * compile (<linux/blkdev.h> alone cost 20-35 s of a compile under
 * emulation). The loader reads each field's offset and size from the
 * running kernel's BTF and passes them as -DIOBRIDGE_OFF_<name> and
 * -DIOBRIDGE_SIZE_<name> (the list: agent/kernel/kernel_layout.py).
 */
#ifndef _IOBRIDGE_KERNEL_LAYOUT_H
#define _IOBRIDGE_KERNEL_LAYOUT_H

/* Read field `name` of the kernel object at `ptr` into `dst`. A kernel whose
 * field is not the size of `dst` fails the compile, naming the field. */
#define KREAD(dst, ptr, name) ({						\
	_Static_assert(sizeof(dst) == IOBRIDGE_SIZE_##name,			\
		       "kernel field " #name " is not the size read into");	\
	bpf_probe_read_kernel(&(dst), sizeof(dst),				\
		(const void *)((unsigned long)(ptr) + IOBRIDGE_OFF_##name)); })

/* Element i of array field `name`. */
#define KREAD_ELEM(dst, ptr, name, i) ({					\
	_Static_assert(sizeof(dst) == IOBRIDGE_SIZE_##name,			\
		       "kernel field " #name " is not the size read into");	\
	bpf_probe_read_kernel(&(dst), sizeof(dst),				\
		(const void *)((unsigned long)(ptr) + IOBRIDGE_OFF_##name +	\
			       (unsigned long)(i) * IOBRIDGE_SIZE_##name)); })

/* Kernel macros, which BTF does not carry: the op bits of a request end
 * where its first flag bit (an enumerator, from BTF) begins. */
#define KERNEL_REQ_OP_MASK	((1U << KERNEL___REQ_FAILFAST_DEV) - 1)
#define KERNEL_PAGE_MAPPING_ANON	0x1UL	/* low bit of folio->mapping */

#endif /* _IOBRIDGE_KERNEL_LAYOUT_H */
