/* ivshm.h - the whole C core for C programs: layout, region, SPSC, MPMC and publish-subscribe rings, channels. */
#ifndef IVSHM_H
#define IVSHM_H
#include "ivshm_layout.h"
#include "ivshm_region.h"
#include "ivshm_spsc.h"
#include "ivshm_mpmc.h"
#include "ivshm_pubsub.h"
#include "ivshm_chan.h"
#include "ivshm_guard.h"
#endif
