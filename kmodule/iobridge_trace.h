/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The iobridge routing hook: a writable raw tracepoint.
 *
 * Linux 6.1 defines DECLARE_TRACE_WRITABLE only while <trace/bpf_probe.h>
 * re-reads this header, so it is selected with #ifdef; elsewhere it is a
 * plain DECLARE_TRACE.  Only the BPF stage records the writable size.
 */
#undef TRACE_SYSTEM
#define TRACE_SYSTEM iobridge

#if !defined(_IOBRIDGE_TRACE_H) || defined(TRACE_HEADER_MULTI_READ)
#define _IOBRIDGE_TRACE_H

#include <linux/tracepoint.h>
#include "iobridge_abi.h"

#undef IOBRIDGE_DECLARE_TRACE
#ifdef DECLARE_TRACE_WRITABLE
#define IOBRIDGE_DECLARE_TRACE(call, proto, args, size) \
	DECLARE_TRACE_WRITABLE(call, PARAMS(proto), PARAMS(args), size)
#else
#define IOBRIDGE_DECLARE_TRACE(call, proto, args, size) \
	DECLARE_TRACE(call, PARAMS(proto), PARAMS(args))
#endif

IOBRIDGE_DECLARE_TRACE(iobridge_route,
	TP_PROTO(struct iobridge_route_ctx *ctx),
	TP_ARGS(ctx),
	sizeof(struct iobridge_route_ctx)
);

/*
 * Leg state changes (A = healthy, F = failed, S = failed and stale), for
 * the agent and for tracing tools.
 */
TRACE_EVENT(iobridge_leg_state,
	TP_PROTO(u32 target_id, u32 leg, char state),
	TP_ARGS(target_id, leg, state),
	TP_STRUCT__entry(
		__field(u32, target_id)
		__field(u32, leg)
		__field(char, state)
	),
	TP_fast_assign(
		__entry->target_id = target_id;
		__entry->leg = leg;
		__entry->state = state;
	),
	TP_printk("target=%u leg=%u state=%c", __entry->target_id,
		  __entry->leg, __entry->state)
);

#endif /* _IOBRIDGE_TRACE_H */

#undef TRACE_INCLUDE_PATH
#define TRACE_INCLUDE_PATH .
#undef TRACE_INCLUDE_FILE
#define TRACE_INCLUDE_FILE iobridge_trace
#include <trace/define_trace.h>
