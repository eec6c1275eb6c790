/*
 * osvm guest agent: PID 1 of a microVM.
 *
 * It mounts /proc, /sys and /dev and loads the kernel modules listed in /osvm/modules.list. It
 * switches to an ext4 root disk when /osvm/root names one, and configures eth0 for QEMU's user
 * network. Then it waits on the virtio-serial port "osvm.agent" for the host's START message
 * with the component's argv and environment. The component's stdout and stderr go to the port "osvm.log",
 * which QEMU appends to the instance's output.log. Exec probes arrive on "osvm.exec" (or on
 * "osvm.agent"). The port "osvm.vsock" carries host streams to guest TCP listeners, using the
 * multiplexer protocol of docs/firecracker.md. It also carries guest connections to 127.0.0.1:P
 * to the host, for each host port P in osvm.host_ports= on the kernel command line. A SHUTDOWN
 * message, the ACPI power button, SIGTERM or SIGPWR stop the component with its stop signal, then SIGKILL after
 * the grace period, then power the VM off. When the component exits on its own, the agent powers the VM off too, so
 * QEMU's exit is the instance's exit. WRITE_FILES puts the instance's certificate files into
 * /run/osvm/tls, before START and after each renewal, and SIGNAL sends a signal to the component.
 *
 * The wire format is described in src/osvm/runtimes/microvm/protocol.py, which must stay in step
 * with the constants below.
 *
 * Build: gcc -static -O2 -s -o osvm-agent agent.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PROTOCOL_VERSION 2
#define FRAME_MAGIC 0x4F56 /* "OV" */
#define HEADER_SIZE 8
#define MAX_PAYLOAD (1u << 20)

enum message_type {
    MSG_HELLO = 1,
    MSG_START = 2,
    MSG_READY = 3,
    MSG_START_FAILED = 4,
    MSG_EXEC = 5,
    MSG_EXEC_RESULT = 6,
    MSG_SHUTDOWN = 8,
    MSG_EXITED = 9,
    MSG_ECHO = 10,
    MSG_ECHO_REPLY = 11,
    MSG_ERROR = 12,
    MSG_KEEPALIVE = 13,
    MSG_WRITE_FILES = 14,
    MSG_SIGNAL = 15,
    MSG_RESULT = 16,
    MSG_HELLO_REQUEST = 17,
};

enum component_state { STATE_WAITING = 0, STATE_RUNNING = 1, STATE_EXITED = 2, STATE_STOPPING = 3 };

#define DEFAULT_PATH "/app:/app/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define DEFAULT_GRACE_MS 10000
/* Output kept per exec request. The host shows only its last line. */
#define EXEC_TAIL_BYTES 4096
#define MAX_EXEC_JOBS 16
#define MAX_INPUTS 8
/* Frames queued for a host that is not connected. More are dropped, because HELLO restates the state. */
#define MAX_QUEUED_BYTES (1u << 20)
/* Largest ECHO payload. Every frame stays below virtio_console's 32 KiB write limit, so one write()
 * sends one whole frame and a client never receives part of a frame meant for its predecessor. */
#define MAX_ECHO_BYTES (16u * 1024)
/* Component output buffered for the log port. Above it, the agent stops reading the component's pipe. */
#define LOG_HIGH_WATER (64u * 1024)
/* How long the agent waits for devices that modules create asynchronously. */
#define DEVICE_WAIT_MS 10000
/* How long the agent tries to deliver its last messages before it powers off. */
#define FLUSH_BEFORE_POWEROFF_MS 1000
/* How often disconnected ports are checked, in case SIGIO for a host connection is missed. */
#define RECONNECT_CHECK_MS 1000
/* WRITE_FILES writes only into FILES_DIR. It is on the /run tmpfs, so private keys never reach a disk. */
#define FILES_PARENT_DIR "/run/osvm"
#define FILES_DIR "/run/osvm/tls"
#define MAX_FILES 8
#define MAX_FILE_NAME 64

struct buffer {
    uint8_t *data;
    size_t len;
    size_t cap;
};

struct channel {
    const char *name;
    int fd;
    int connected;
    struct buffer in;
    struct buffer out;
};

struct exec_job {
    int used;
    uint32_t id;
    pid_t pid;
    int out_fd;
    struct channel *channel;
    char tail[EXEC_TAIL_BYTES];
    size_t tail_len;
    int64_t deadline_ms;
    /* The request's client must send KEEPALIVE before this time, or the command is killed. */
    uint32_t keepalive_ms;
    int64_t alive_until_ms;
};

static struct channel control = {.name = "osvm.agent", .fd = -1};
static struct channel exec_channel = {.name = "osvm.exec", .fd = -1};
/* The port of the vsock multiplexer, whose frames differ from the agent protocol's. */
static struct channel vsock_port = {.name = "osvm.vsock", .fd = -1};
static int log_fd = -1;
static struct buffer log_pending;
static unsigned long log_dropped;

static int input_fds[MAX_INPUTS];
static int input_count;
static int signal_fd = -1;

static enum component_state state = STATE_WAITING;
static pid_t component_pid;
static int component_out = -1;
static int component_exec_check = -1;
static int exit_code = -1;
static char **component_env;
static char *component_workdir;
static int stop_signal = SIGTERM;
static uint32_t grace_ms = DEFAULT_GRACE_MS;
static int shutting_down;
static int64_t kill_deadline_ms = -1;
/* The component's argv from START, for messages. */
static char **start_argv;

static struct exec_job jobs[MAX_EXEC_JOBS];

/* --- small helpers ------------------------------------------------------------------------ */

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
}

/* Write a diagnostic line to the console, which QEMU writes to the instance's serial.log. */
static void say(const char *format, ...) {
    char line[1024];
    va_list args;
    va_start(args, format);
    int n = snprintf(line, sizeof line, "osvm-agent: ");
    n += vsnprintf(line + n, sizeof line - n - 1, format, args);
    va_end(args);
    if (n > (int)sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    ssize_t ignored = write(STDERR_FILENO, line, n);
    (void)ignored;
}

static void *checked_realloc(void *pointer, size_t size) {
    void *result = realloc(pointer, size);
    if (result == NULL) {
        say("out of memory allocating %zu bytes", size);
        abort();
    }
    return result;
}

static void buffer_reserve(struct buffer *buffer, size_t extra) {
    if (buffer->len + extra <= buffer->cap)
        return;
    size_t cap = buffer->cap ? buffer->cap : 4096;
    while (cap < buffer->len + extra)
        cap *= 2;
    buffer->data = checked_realloc(buffer->data, cap);
    buffer->cap = cap;
}

static void buffer_append(struct buffer *buffer, const void *data, size_t len) {
    buffer_reserve(buffer, len);
    memcpy(buffer->data + buffer->len, data, len);
    buffer->len += len;
}

static void buffer_consume(struct buffer *buffer, size_t len) {
    memmove(buffer->data, buffer->data + len, buffer->len - len);
    buffer->len -= len;
}

static void set_nonblocking(int fd) {
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static int read_file(const char *path, char *out, size_t size) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, out, size - 1);
    close(fd);
    if (n < 0)
        return -1;
    out[n] = '\0';
    while (n > 0 && (out[n - 1] == '\n' || out[n - 1] == ' '))
        out[--n] = '\0';
    return (int)n;
}

/* --- frames ------------------------------------------------------------------------------- */

static void put_u32(struct buffer *buffer, uint32_t value) {
    uint32_t be = htonl(value);
    buffer_append(buffer, &be, 4);
}

static void put_bytes(struct buffer *buffer, const void *data, size_t len) {
    put_u32(buffer, (uint32_t)len);
    buffer_append(buffer, data, len);
}

static void put_string(struct buffer *buffer, const char *text) {
    put_bytes(buffer, text, strlen(text));
}

struct reader {
    const uint8_t *p;
    size_t left;
    int bad;
};

static uint32_t get_u32(struct reader *reader) {
    if (reader->left < 4) {
        reader->bad = 1;
        return 0;
    }
    uint32_t be;
    memcpy(&be, reader->p, 4);
    reader->p += 4;
    reader->left -= 4;
    return ntohl(be);
}

/* Return a NUL-terminated copy of a length-prefixed string, or NULL when the payload is short. */
static char *get_string(struct reader *reader) {
    uint32_t len = get_u32(reader);
    if (reader->bad || len > reader->left) {
        reader->bad = 1;
        return NULL;
    }
    char *text = checked_realloc(NULL, len + 1);
    memcpy(text, reader->p, len);
    text[len] = '\0';
    reader->p += len;
    reader->left -= len;
    return text;
}

/* Point *data at a length-prefixed byte string in the payload, without copying, and return its
 * length. Sets reader->bad when the payload is short. */
static uint32_t get_bytes(struct reader *reader, const uint8_t **data) {
    uint32_t len = get_u32(reader);
    if (reader->bad || len > reader->left) {
        reader->bad = 1;
        *data = NULL;
        return 0;
    }
    *data = reader->p;
    reader->p += len;
    reader->left -= len;
    return len;
}

static char **get_string_list(struct reader *reader) {
    uint32_t count = get_u32(reader);
    if (reader->bad || count > reader->left / 4) {
        reader->bad = 1;
        return NULL;
    }
    char **list = checked_realloc(NULL, (count + 1) * sizeof(char *));
    for (uint32_t i = 0; i < count; i++) {
        list[i] = get_string(reader);
        if (list[i] == NULL) {
            list[i] = NULL;
            reader->bad = 1;
            return list;
        }
    }
    list[count] = NULL;
    return list;
}

static void free_string_list(char **list) {
    if (list == NULL)
        return;
    for (char **item = list; *item; item++)
        free(*item);
    free(list);
}

static void vsock_flush_port(void);

static void flush_channel(struct channel *channel) {
    if (channel == &vsock_port) {
        vsock_flush_port();
        return;
    }
    while (channel->connected && channel->out.len >= HEADER_SIZE) {
        uint32_t payload_len;
        memcpy(&payload_len, channel->out.data + 4, 4);
        size_t frame_len = HEADER_SIZE + ntohl(payload_len);
        ssize_t n = write(channel->fd, channel->out.data, frame_len <= channel->out.len ? frame_len : channel->out.len);
        if (n > 0) {
            buffer_consume(&channel->out, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        return; /* On EAGAIN, poll waits for POLLOUT. Other errors show up as POLLHUP. */
    }
}

/* Queue one frame whose payload is in `payload`, and try to send it at once. */
static void send_frame(struct channel *channel, uint8_t type, const struct buffer *payload) {
    if (channel->fd < 0)
        return;
    size_t len = payload ? payload->len : 0;
    if (!channel->connected && channel->out.len + len > MAX_QUEUED_BYTES)
        return;
    uint8_t header[HEADER_SIZE] = {FRAME_MAGIC >> 8, FRAME_MAGIC & 0xff, type, 0};
    uint32_t be = htonl((uint32_t)len);
    memcpy(header + 4, &be, 4);
    buffer_append(&channel->out, header, HEADER_SIZE);
    if (len)
        buffer_append(&channel->out, payload->data, len);
    flush_channel(channel);
}

static void send_hello(struct channel *channel) {
    struct buffer payload = {0};
    put_u32(&payload, PROTOCOL_VERSION);
    put_u32(&payload, (uint32_t)state);
    put_u32(&payload, (uint32_t)component_pid);
    put_u32(&payload, (uint32_t)exit_code);
    send_frame(channel, MSG_HELLO, &payload);
    free(payload.data);
}

static void send_text(struct channel *channel, uint8_t type, const char *text) {
    struct buffer payload = {0};
    put_string(&payload, text);
    send_frame(channel, type, &payload);
    free(payload.data);
}

static void send_u32(struct channel *channel, uint8_t type, uint32_t value) {
    struct buffer payload = {0};
    put_u32(&payload, value);
    send_frame(channel, type, &payload);
    free(payload.data);
}

/* Send the RESULT of a WRITE_FILES or SIGNAL request, with error "" on success. */
static void send_result(struct channel *channel, uint32_t id, const char *error) {
    struct buffer payload = {0};
    put_u32(&payload, id);
    put_string(&payload, error);
    send_frame(channel, MSG_RESULT, &payload);
    free(payload.data);
}

/* --- component output and the log port ---------------------------------------------------- */

static void flush_log(void) {
    while (log_pending.len > 0) {
        ssize_t n = write(log_fd, log_pending.data, log_pending.len);
        if (n > 0) {
            buffer_consume(&log_pending, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        return;
    }
}

static void write_log(const void *data, size_t len) {
    if (log_fd < 0) {
        ssize_t ignored = write(STDERR_FILENO, data, len);
        (void)ignored;
        return;
    }
    if (log_pending.len + len > 4 * LOG_HIGH_WATER) {
        log_dropped += len;
        return;
    }
    buffer_append(&log_pending, data, len);
    flush_log();
}

/* Write a line both to the console and to the instance's output log. */
static void announce(const char *format, ...) {
    char line[512];
    va_list args;
    va_start(args, format);
    int n = snprintf(line, sizeof line, "osvm-agent: ");
    n += vsnprintf(line + n, sizeof line - n - 1, format, args);
    va_end(args);
    if (n > (int)sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    ssize_t ignored = write(STDERR_FILENO, line, n);
    (void)ignored;
    if (log_fd >= 0)
        write_log(line, n);
}

static void drain_component_output(void) {
    char chunk[16384];
    while (component_out >= 0 && log_pending.len < LOG_HIGH_WATER) {
        ssize_t n = read(component_out, chunk, sizeof chunk);
        if (n > 0) {
            write_log(chunk, (size_t)n);
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        close(component_out);
        component_out = -1;
    }
}

/* --- boot steps --------------------------------------------------------------------------- */

static void mount_filesystem(const char *source, const char *target, const char *type, unsigned long flags,
                             const char *options) {
    mkdir(target, 0755);
    if (mount(source, target, type, flags, options) != 0 && errno != EBUSY)
        say("mounting %s on %s failed: %s", type, target, strerror(errno));
}

static void mount_basics(void) {
    mount_filesystem("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount_filesystem("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount_filesystem("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    mount_filesystem("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666");
    mount_filesystem("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    mount_filesystem("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
}

static void load_modules(void) {
    FILE *list = fopen("/osvm/modules.list", "re");
    if (list == NULL)
        return;
    char path[512];
    while (fgets(path, sizeof path, list)) {
        path[strcspn(path, "\n")] = '\0';
        if (path[0] == '\0')
            continue;
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            say("cannot open module %s: %s", path, strerror(errno));
            continue;
        }
        if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST)
            say("loading module %s failed: %s", path, strerror(errno));
        close(fd);
    }
    fclose(list);
}

static int wait_for_path(const char *path, int timeout_ms) {
    int64_t deadline = now_ms() + timeout_ms;
    while (access(path, F_OK) != 0) {
        if (now_ms() >= deadline)
            return -1;
        sleep_ms(2);
    }
    return 0;
}

/* Mount the root disk named in /osvm/root and make it / (what switch_root does, minus deleting the initramfs). */
static void switch_to_root_disk(void) {
    char device[128];
    if (read_file("/osvm/root", device, sizeof device) <= 0)
        return;
    if (wait_for_path(device, DEVICE_WAIT_MS) != 0) {
        say("root disk %s did not appear within %d ms", device, DEVICE_WAIT_MS);
        return;
    }
    mkdir("/newroot", 0755);
    if (mount(device, "/newroot", "ext4", 0, NULL) != 0) {
        say("mounting root disk %s failed: %s", device, strerror(errno));
        return;
    }
    const char *moved[] = {"/proc", "/sys", "/dev", "/run"};
    for (size_t i = 0; i < sizeof moved / sizeof moved[0]; i++) {
        char target[64];
        snprintf(target, sizeof target, "/newroot%s", moved[i]);
        mkdir(target, 0755);
        if (mount(moved[i], target, NULL, MS_MOVE, NULL) != 0)
            say("moving %s to the root disk failed: %s", moved[i], strerror(errno));
    }
    if (chdir("/newroot") != 0 || mount(".", "/", NULL, MS_MOVE, NULL) != 0 || chroot(".") != 0 ||
        chdir("/") != 0) {
        say("switching to the root disk failed: %s", strerror(errno));
        return;
    }
    mkdir("/tmp", 01777);
}

static void set_interface(int sock, const char *name, unsigned long request, in_addr_t address) {
    struct ifreq ifr = {0};
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    sin->sin_family = AF_INET;
    sin->sin_addr.s_addr = address;
    if (ioctl(sock, request, &ifr) != 0)
        say("configuring %s failed: %s", name, strerror(errno));
}

static void bring_up(int sock, const char *name) {
    struct ifreq ifr = {0};
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(sock, SIOCGIFFLAGS, &ifr) != 0)
        return;
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    if (ioctl(sock, SIOCSIFFLAGS, &ifr) != 0)
        say("bringing up %s failed: %s", name, strerror(errno));
}

/* Give eth0 QEMU user networking's default guest address 10.0.2.15/24, via 10.0.2.2. */
static void configure_network(void) {
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return;
    bring_up(sock, "lo"); /* The kernel adds 127.0.0.1/8 when lo goes up. */
    if (access("/sys/class/net/eth0", F_OK) == 0) {
        set_interface(sock, "eth0", SIOCSIFADDR, inet_addr("10.0.2.15"));
        set_interface(sock, "eth0", SIOCSIFNETMASK, inet_addr("255.255.255.0"));
        bring_up(sock, "eth0");
        struct rtentry route = {0};
        struct sockaddr_in *gateway = (struct sockaddr_in *)&route.rt_gateway;
        struct sockaddr_in *destination = (struct sockaddr_in *)&route.rt_dst;
        struct sockaddr_in *mask = (struct sockaddr_in *)&route.rt_genmask;
        gateway->sin_family = destination->sin_family = mask->sin_family = AF_INET;
        gateway->sin_addr.s_addr = inet_addr("10.0.2.2");
        route.rt_flags = RTF_UP | RTF_GATEWAY;
        if (ioctl(sock, SIOCADDRT, &route) != 0 && errno != EEXIST)
            say("adding the default route failed: %s", strerror(errno));
        if (access("/etc/resolv.conf", F_OK) != 0) {
            int fd = open("/etc/resolv.conf", O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
            if (fd >= 0) {
                const char *text = "nameserver 10.0.2.3\n";
                ssize_t ignored = write(fd, text, strlen(text));
                (void)ignored;
                close(fd);
            }
        }
    }
    close(sock);
}

/* Return the /dev path of the virtio-serial port with this name, or NULL when it is not there yet. */
static const char *find_port(const char *wanted) {
    static char device[300];
    DIR *dir = opendir("/sys/class/virtio-ports");
    if (dir == NULL)
        return NULL;
    struct dirent *entry;
    const char *found = NULL;
    while ((entry = readdir(dir)) != NULL) {
        if (entry->d_name[0] == '.')
            continue;
        char path[300], name[64];
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", entry->d_name);
        if (read_file(path, name, sizeof name) > 0 && strcmp(name, wanted) == 0) {
            snprintf(device, sizeof device, "/dev/%s", entry->d_name);
            if (access(device, F_OK) == 0)
                found = device;
            break;
        }
    }
    closedir(dir);
    return found;
}

static void open_ports(void) {
    /* Ports appear after the host's control messages, a little after virtio_console loads. */
    int64_t deadline = now_ms() + DEVICE_WAIT_MS;
    const char *names[] = {"osvm.agent", "osvm.exec", "osvm.log", "osvm.vsock"};
    char *paths[4] = {NULL, NULL, NULL, NULL};
    while (now_ms() < deadline) {
        int missing = 0;
        for (int i = 0; i < 4; i++) {
            if (paths[i] != NULL)
                continue;
            const char *found = find_port(names[i]);
            if (found)
                paths[i] = strdup(found);
            else
                missing++;
        }
        if (!missing)
            break;
        sleep_ms(2);
    }
    const char *control_path = paths[0], *exec_path = paths[1], *log_path = paths[2], *vsock_path = paths[3];
    if (log_path) {
        log_fd = open(log_path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
        if (log_fd < 0)
            say("cannot open %s: %s", log_path, strerror(errno));
    } else {
        say("port osvm.log not found: component output goes to the console");
    }
    struct channel *channels[] = {&control, &exec_channel, &vsock_port};
    const char *channel_paths[] = {control_path, exec_path, vsock_path};
    for (int i = 0; i < 3; i++) {
        if (channel_paths[i] == NULL) {
            say("port %s not found", channels[i]->name);
            continue;
        }
        int fd = open(channel_paths[i], O_RDWR | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0) {
            say("cannot open %s: %s", channel_paths[i], strerror(errno));
            continue;
        }
        /* virtio_console sends SIGIO when the host side connects. */
        fcntl(fd, F_SETOWN, getpid());
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_ASYNC);
        channels[i]->fd = fd;
    }
}

static int supports_power_key(int fd) {
    unsigned long bits[KEY_MAX / (8 * sizeof(unsigned long)) + 1] = {0};
    if (ioctl(fd, EVIOCGBIT(EV_KEY, sizeof bits), bits) < 0)
        return 0;
    return (bits[KEY_POWER / (8 * sizeof(unsigned long))] >> (KEY_POWER % (8 * sizeof(unsigned long)))) & 1;
}

static void open_power_button(void) {
    DIR *dir = opendir("/dev/input");
    if (dir == NULL)
        return;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL && input_count < MAX_INPUTS) {
        if (strncmp(entry->d_name, "event", 5) != 0)
            continue;
        char path[300];
        snprintf(path, sizeof path, "/dev/input/%s", entry->d_name);
        int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0)
            continue;
        if (supports_power_key(fd))
            input_fds[input_count++] = fd;
        else
            close(fd);
    }
    closedir(dir);
    if (input_count == 0)
        say("no power button input device: ACPI shutdown requests are not seen");
}

/* --- processes ---------------------------------------------------------------------------- */

static sigset_t handled_signals;

static void exec_in_child(char **argv, int output_fd, const char *workdir) {
    sigprocmask(SIG_UNBLOCK, &handled_signals, NULL);
    setsid();
    int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    dup2(null_fd, STDIN_FILENO);
    dup2(output_fd, STDOUT_FILENO);
    dup2(output_fd, STDERR_FILENO);
    if (workdir && chdir(workdir) != 0)
        dprintf(output_fd, "osvm-agent: cannot change to %s: %s\n", workdir, strerror(errno));
    static char *default_env[] = {"PATH=" DEFAULT_PATH, NULL};
    environ = component_env ? component_env : default_env;
    execvp(argv[0], argv);
}

static const char *effective_workdir(void) {
    if (component_workdir && component_workdir[0])
        return component_workdir;
    return access("/app", F_OK) == 0 ? "/app" : "/";
}

static void start_component(char **argv) {
    int output[2], check[2];
    if (pipe2(output, O_CLOEXEC) != 0 || pipe2(check, O_CLOEXEC) != 0) {
        send_text(&control, MSG_START_FAILED, strerror(errno));
        return;
    }
    pid_t pid = fork();
    if (pid == 0) {
        close(output[0]);
        close(check[0]);
        exec_in_child(argv, output[1], effective_workdir());
        int error = errno;
        ssize_t ignored = write(check[1], &error, sizeof error);
        (void)ignored;
        _exit(127);
    }
    close(output[1]);
    close(check[1]);
    if (pid < 0) {
        close(output[0]);
        close(check[0]);
        send_text(&control, MSG_START_FAILED, strerror(errno));
        return;
    }
    component_pid = pid;
    component_out = output[0];
    set_nonblocking(component_out);
    /* The check pipe is close-on-exec: EOF means execvp succeeded, an errno means it failed. */
    component_exec_check = check[0];
    state = STATE_RUNNING;
}

static void on_exec_check(char **argv_for_message) {
    int error = 0;
    ssize_t n = read(component_exec_check, &error, sizeof error);
    close(component_exec_check);
    component_exec_check = -1;
    if (n == (ssize_t)sizeof error) {
        char message[512];
        snprintf(message, sizeof message, "cannot run %s: %s", argv_for_message ? argv_for_message[0] : "?",
                 strerror(error));
        announce("%s", message);
        send_text(&control, MSG_START_FAILED, message);
        return;
    }
    announce("started the component as pid %d", component_pid);
    send_u32(&control, MSG_READY, (uint32_t)component_pid);
}

static struct exec_job *find_job(pid_t pid) {
    for (int i = 0; i < MAX_EXEC_JOBS; i++)
        if (jobs[i].used && jobs[i].pid == pid)
            return &jobs[i];
    return NULL;
}

static void keep_tail(struct exec_job *job, const char *data, size_t len) {
    if (len >= EXEC_TAIL_BYTES) {
        memcpy(job->tail, data + len - EXEC_TAIL_BYTES, EXEC_TAIL_BYTES);
        job->tail_len = EXEC_TAIL_BYTES;
        return;
    }
    if (job->tail_len + len > EXEC_TAIL_BYTES) {
        size_t drop = job->tail_len + len - EXEC_TAIL_BYTES;
        memmove(job->tail, job->tail + drop, job->tail_len - drop);
        job->tail_len -= drop;
    }
    memcpy(job->tail + job->tail_len, data, len);
    job->tail_len += len;
}

static void read_job_output(struct exec_job *job) {
    char chunk[4096];
    while (job->out_fd >= 0) {
        ssize_t n = read(job->out_fd, chunk, sizeof chunk);
        if (n > 0) {
            keep_tail(job, chunk, (size_t)n);
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        close(job->out_fd);
        job->out_fd = -1;
    }
}

static void finish_job(struct exec_job *job, int code) {
    read_job_output(job);
    if (job->out_fd >= 0)
        close(job->out_fd);
    /* Background children of the command would keep running: end its whole session. */
    kill(-job->pid, SIGKILL);
    struct buffer payload = {0};
    put_u32(&payload, job->id);
    put_u32(&payload, (uint32_t)code);
    put_bytes(&payload, job->tail, job->tail_len);
    send_frame(job->channel, MSG_EXEC_RESULT, &payload);
    free(payload.data);
    memset(job, 0, sizeof *job);
    job->out_fd = -1;
}

static void send_exec_failure(struct channel *channel, uint32_t id, const char *reason) {
    char text[256];
    snprintf(text, sizeof text, "osvm-agent: %s\n", reason);
    struct buffer payload = {0};
    put_u32(&payload, id);
    put_u32(&payload, 125);
    put_string(&payload, text);
    send_frame(channel, MSG_EXEC_RESULT, &payload);
    free(payload.data);
}

static void start_exec(struct channel *channel, uint32_t id, uint32_t timeout_ms, uint32_t keepalive_ms, char **argv) {
    struct exec_job *job = NULL;
    for (int i = 0; i < MAX_EXEC_JOBS && job == NULL; i++)
        if (!jobs[i].used)
            job = &jobs[i];
    if (job == NULL) {
        send_exec_failure(channel, id, "too many exec requests at once");
        return;
    }
    if (argv == NULL || argv[0] == NULL) {
        send_exec_failure(channel, id, "empty command");
        return;
    }

    int output[2];
    if (pipe2(output, O_CLOEXEC) != 0) {
        send_exec_failure(channel, id, strerror(errno));
        return;
    }
    pid_t pid = fork();
    if (pid == 0) {
        close(output[0]);
        exec_in_child(argv, output[1], effective_workdir());
        int error = errno;
        dprintf(output[1], "osvm-agent: cannot run %s: %s\n", argv[0], strerror(error));
        _exit(error == ENOENT ? 127 : 126);
    }
    close(output[1]);
    if (pid < 0) {
        close(output[0]);
        send_exec_failure(channel, id, strerror(errno));
        return;
    }

    set_nonblocking(output[0]);
    job->used = 1;
    job->id = id;
    job->pid = pid;
    job->out_fd = output[0];
    job->channel = channel;
    job->tail_len = 0;
    job->deadline_ms = timeout_ms ? now_ms() + timeout_ms : -1;
    job->keepalive_ms = keepalive_ms;
    job->alive_until_ms = keepalive_ms ? now_ms() + keepalive_ms : -1;
}

static int status_code(int status) {
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return -1;
}

/* --- shutdown ----------------------------------------------------------------------------- */

static void flush_before_poweroff(void) {
    int64_t deadline = now_ms() + FLUSH_BEFORE_POWEROFF_MS;
    struct channel *channels[] = {&control, &exec_channel};
    for (;;) {
        int pending = 0;
        struct pollfd fds[3];
        int count = 0;
        for (int i = 0; i < 2; i++) {
            flush_channel(channels[i]);
            if (channels[i]->connected && channels[i]->out.len) {
                fds[count++] = (struct pollfd){.fd = channels[i]->fd, .events = POLLOUT};
                pending = 1;
            }
        }
        if (log_fd >= 0 && log_pending.len) {
            flush_log();
            if (log_pending.len) {
                fds[count++] = (struct pollfd){.fd = log_fd, .events = POLLOUT};
                pending = 1;
            }
        }
        int64_t left = deadline - now_ms();
        if (!pending || left <= 0)
            break;
        poll(fds, count, (int)left);
    }
    tcdrain(STDERR_FILENO);
}

static void power_off(void) {
    kill(-1, SIGKILL);
    flush_before_poweroff();
    sync();
    reboot(RB_POWER_OFF);
    /* reboot() returns only on failure; PID 1 must not exit, so wait to be killed. */
    say("power off failed: %s", strerror(errno));
    for (;;)
        pause();
}

static void request_shutdown(const char *reason) {
    if (shutting_down)
        return;
    shutting_down = 1;
    if (state != STATE_RUNNING) {
        announce("shutting down (%s)", reason);
        power_off();
    }
    announce("shutting down (%s): sending signal %d to pid %d, SIGKILL after %u ms", reason, stop_signal,
             component_pid, grace_ms);
    state = STATE_STOPPING;
    kill(component_pid, stop_signal);
    kill_deadline_ms = now_ms() + grace_ms;
}

static void on_component_exit(int status) {
    drain_component_output();
    exit_code = status_code(status);
    state = STATE_EXITED;
    if (WIFSIGNALED(status))
        announce("component exited with status %d (killed by signal %d)", exit_code, WTERMSIG(status));
    else
        announce("component exited with status %d", exit_code);
    send_u32(&control, MSG_EXITED, (uint32_t)exit_code);
    power_off();
}

static void reap_children(void) {
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid <= 0)
            return;
        if (pid == component_pid && (state == STATE_RUNNING || state == STATE_STOPPING)) {
            if (component_exec_check >= 0)
                on_exec_check(start_argv);
            on_component_exit(status);
            continue;
        }
        struct exec_job *job = find_job(pid);
        if (job)
            finish_job(job, status_code(status));
    }
}

/* --- files and signals from the host ------------------------------------------------------ */

struct file_entry {
    char name[MAX_FILE_NAME + 1];
    /* ".<name>.tmp" in FILES_DIR, renamed to name once every file of the message is written. */
    char temp[MAX_FILE_NAME + 8];
    uint32_t mode;
    const uint8_t *data;
    uint32_t len;
};

static int is_file_name_char(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
           c == '-';
}

/* Copy the file name of path into name when path is FILES_DIR/<name> and name is allowed: 1 to
 * MAX_FILE_NAME letters, digits, '.', '_' or '-', not starting with '.'. Returns 0 otherwise. */
static int parse_file_path(const uint8_t *path, uint32_t len, char *name) {
    size_t prefix = strlen(FILES_DIR);
    if (len <= prefix + 1 || len - prefix - 1 > MAX_FILE_NAME)
        return 0;
    if (memcmp(path, FILES_DIR, prefix) != 0 || path[prefix] != '/' || path[prefix + 1] == '.')
        return 0;
    size_t name_len = len - prefix - 1;
    for (size_t i = 0; i < name_len; i++)
        if (!is_file_name_char((char)path[prefix + 1 + i]))
            return 0;
    memcpy(name, path + prefix + 1, name_len);
    name[name_len] = '\0';
    return 1;
}

static int write_all(int fd, const uint8_t *data, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            if (n == 0)
                errno = EIO;
            return -1;
        }
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Open FILES_DIR, creating it (mode 0700) and its parent when missing. Returns -1 with errno set on failure. */
static int open_files_dir(void) {
    if (mkdir(FILES_PARENT_DIR, 0755) != 0 && errno != EEXIST)
        return -1;
    if (mkdir(FILES_DIR, 0700) != 0 && errno != EEXIST)
        return -1;
    return open(FILES_DIR, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
}

/* Write a file's content under its temporary name with its mode. Returns -1 with errno set on failure. */
static int write_temp_file(int dir_fd, const struct file_entry *file) {
    unlinkat(dir_fd, file->temp, 0);
    /* Created as 0600 and changed after, so a key is never readable by others, whatever the umask. */
    int fd = openat(dir_fd, file->temp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    if (fchmod(fd, (mode_t)file->mode) != 0 || write_all(fd, file->data, file->len) != 0) {
        int error = errno;
        close(fd);
        unlinkat(dir_fd, file->temp, 0);
        errno = error;
        return -1;
    }
    return close(fd);
}

/* Write the files to their temporary names, then rename each over its name. Returns "" or the error. */
static const char *replace_files(struct file_entry *files, uint32_t count, char *error, size_t size) {
    error[0] = '\0';
    int dir_fd = open_files_dir();
    if (dir_fd < 0) {
        snprintf(error, size, "cannot open %s: %s", FILES_DIR, strerror(errno));
        return error;
    }
    uint32_t written = 0;
    while (written < count && write_temp_file(dir_fd, &files[written]) == 0)
        written++;
    if (written < count)
        snprintf(error, size, "cannot write %s/%s: %s", FILES_DIR, files[written].name, strerror(errno));
    for (uint32_t i = 0; i < written && !error[0]; i++)
        if (renameat(dir_fd, files[i].temp, dir_fd, files[i].name) != 0)
            snprintf(error, size, "cannot rename %s/%s to %s: %s", FILES_DIR, files[i].temp, files[i].name,
                     strerror(errno));
    /* After a failure, no temporary file stays behind. Files renamed before it keep their new content. */
    for (uint32_t i = 0; i < written; i++)
        unlinkat(dir_fd, files[i].temp, 0);
    close(dir_fd);
    return error;
}

static void handle_write_files(struct channel *channel, struct reader *reader) {
    uint32_t id = get_u32(reader);
    uint32_t count = get_u32(reader);
    if (reader->bad) {
        send_text(channel, MSG_ERROR, "invalid WRITE_FILES message");
        return;
    }
    if (count == 0 || count > MAX_FILES) {
        send_result(channel, id, "invalid WRITE_FILES message: it must carry 1 to 8 files");
        return;
    }
    struct file_entry files[MAX_FILES];
    char error[512];
    for (uint32_t i = 0; i < count; i++) {
        const uint8_t *path;
        uint32_t path_len = get_bytes(reader, &path);
        files[i].mode = get_u32(reader);
        files[i].len = get_bytes(reader, &files[i].data);
        if (reader->bad) {
            send_result(channel, id, "invalid WRITE_FILES message: the payload is too short");
            return;
        }
        if (!parse_file_path(path, path_len, files[i].name)) {
            snprintf(error, sizeof error, "path %.*s is not allowed: write to %s/<name>, where name is letters, "
                     "digits, '.', '_' or '-' and does not start with '.'", (int)(path_len < 200 ? path_len : 200),
                     (const char *)path, FILES_DIR);
            send_result(channel, id, error);
            return;
        }
        if (files[i].mode & ~0777u) {
            snprintf(error, sizeof error, "mode %#o of %.*s is invalid: give permission bits only", files[i].mode,
                     MAX_FILE_NAME, files[i].name);
            send_result(channel, id, error);
            return;
        }
        for (uint32_t j = 0; j < i; j++) {
            if (strcmp(files[j].name, files[i].name) == 0) {
                snprintf(error, sizeof error, "file %.*s is listed twice", MAX_FILE_NAME, files[i].name);
                send_result(channel, id, error);
                return;
            }
        }
        snprintf(files[i].temp, sizeof files[i].temp, ".%.*s.tmp", MAX_FILE_NAME, files[i].name);
    }
    if (replace_files(files, count, error, sizeof error)[0]) {
        announce("%s", error);
        send_result(channel, id, error);
        return;
    }
    say("wrote %u files to %s", count, FILES_DIR);
    send_result(channel, id, "");
}

static void handle_signal(struct channel *channel, struct reader *reader) {
    uint32_t id = get_u32(reader);
    uint32_t number = get_u32(reader);
    char error[256] = "";
    if (reader->bad) {
        send_text(channel, MSG_ERROR, "invalid SIGNAL message");
        return;
    }
    if (number == 0 || number >= 65)
        snprintf(error, sizeof error, "invalid signal number %u", number);
    else if (state == STATE_WAITING || (state == STATE_RUNNING && component_exec_check >= 0))
        snprintf(error, sizeof error, "the component has not started yet");
    else if (state == STATE_STOPPING)
        snprintf(error, sizeof error, "the component is stopping");
    else if (state == STATE_EXITED)
        snprintf(error, sizeof error, "the component has exited");
    else if (kill(component_pid, (int)number) != 0)
        snprintf(error, sizeof error, "cannot send signal %u to pid %d: %s", number, component_pid, strerror(errno));
    else
        say("sent signal %u to the component, pid %d", number, component_pid);
    send_result(channel, id, error);
}

/* --- messages ----------------------------------------------------------------------------- */

static char **start_argv;

static void handle_start(struct reader *reader) {
    char *hostname = get_string(reader);
    char **argv = get_string_list(reader);
    char **env = get_string_list(reader);
    char *workdir = get_string(reader);
    uint32_t signal_number = get_u32(reader);
    uint32_t grace = get_u32(reader);

    int valid = !reader->bad && argv != NULL && argv[0] != NULL;
    if (!valid || state != STATE_WAITING) {
        if (!valid)
            send_text(&control, MSG_ERROR, "invalid START message");
        else
            send_hello(&control); /* Already started: restate the state instead. */
        free(hostname);
        free(workdir);
        free_string_list(argv);
        free_string_list(env);
        return;
    }

    if (hostname[0])
        sethostname(hostname, strlen(hostname));
    free(hostname);
    component_env = env;
    component_workdir = workdir;
    stop_signal = signal_number > 0 && signal_number < 65 ? (int)signal_number : SIGTERM;
    grace_ms = grace;
    mkdir("/data", 0755);
    start_argv = argv;
    start_component(argv);
}

static void handle_frame(struct channel *channel, uint8_t type, const uint8_t *payload, size_t len) {
    struct reader reader = {payload, len, 0};
    switch (type) {
    case MSG_START:
        handle_start(&reader);
        break;
    case MSG_EXEC: {
        uint32_t id = get_u32(&reader);
        uint32_t timeout_ms = get_u32(&reader);
        uint32_t keepalive_ms = get_u32(&reader);
        char **argv = get_string_list(&reader);
        if (reader.bad)
            send_text(channel, MSG_ERROR, "invalid EXEC message");
        else
            start_exec(channel, id, timeout_ms, keepalive_ms, argv);
        free_string_list(argv);
        break;
    }
    case MSG_KEEPALIVE: {
        uint32_t id = get_u32(&reader);
        for (int i = 0; i < MAX_EXEC_JOBS && !reader.bad; i++)
            if (jobs[i].used && jobs[i].id == id && jobs[i].keepalive_ms)
                jobs[i].alive_until_ms = now_ms() + jobs[i].keepalive_ms;
        break;
    }
    case MSG_SHUTDOWN:
        request_shutdown("shutdown requested by the host");
        break;
    case MSG_WRITE_FILES:
        handle_write_files(channel, &reader);
        break;
    case MSG_SIGNAL:
        handle_signal(channel, &reader);
        break;
    case MSG_HELLO_REQUEST:
        send_hello(channel);
        break;
    case MSG_ECHO: {
        if (len > MAX_ECHO_BYTES) {
            send_text(channel, MSG_ERROR, "ECHO payload larger than 16 KiB");
            break;
        }
        struct buffer reply = {0};
        buffer_append(&reply, payload, len);
        send_frame(channel, MSG_ECHO_REPLY, &reply);
        free(reply.data);
        break;
    }
    default:
        send_text(channel, MSG_ERROR, "unknown message type");
    }
}

static void parse_frames(struct channel *channel) {
    struct buffer *in = &channel->in;
    while (in->len >= HEADER_SIZE) {
        if (in->data[0] != (FRAME_MAGIC >> 8) || in->data[1] != (FRAME_MAGIC & 0xff)) {
            /* Bytes left from an earlier connection: skip to the next frame start. */
            size_t skip = 1;
            while (skip + 1 < in->len &&
                   !(in->data[skip] == (FRAME_MAGIC >> 8) && in->data[skip + 1] == (FRAME_MAGIC & 0xff)))
                skip++;
            buffer_consume(in, skip);
            continue;
        }
        uint32_t len;
        memcpy(&len, in->data + 4, 4);
        len = ntohl(len);
        if (len > MAX_PAYLOAD) {
            send_text(channel, MSG_ERROR, "frame too large");
            buffer_consume(in, 2);
            continue;
        }
        if (in->len < HEADER_SIZE + len)
            return;
        handle_frame(channel, in->data[2], in->data + HEADER_SIZE, len);
        buffer_consume(in, HEADER_SIZE + len);
    }
}

/* --- vsock multiplexer: streams between host programs and guest TCP sockets --------------- */

/*
 * The port "osvm.vsock" carries the guest side of the multiplexer protocol in docs/firecracker.md,
 * whose host side is osvm.vsock.HybridVsockMux. For each OPEN(port, window) from the host the
 * agent connects to 127.0.0.1:<port> in the guest and joins that socket to the channel. In the
 * other direction, the agent listens on 127.0.0.1:P for each host port P in osvm.host_ports=, and
 * opens a channel with OPEN_TO_HOST(P, window) for each connection it accepts there. The host
 * joins that channel to <uds_path>_<P>. Every frame is a 9-byte header (type u8, channel u32,
 * payload length u32, big-endian) and a payload.
 */
#define VSOCK_HEADER_SIZE 9
#define VSOCK_MAX_PAYLOAD 65536u
/* Bytes read from a guest socket per DATA frame. virtio_console takes at most 32 KiB per write(). */
#define VSOCK_DATA_CHUNK (32u * 1024)
/* Receive window announced in OPEN_OK: DATA bytes per channel that the agent buffers at most. */
#define VSOCK_WINDOW (256u * 1024)
#define MAX_VSOCK_STREAMS 128
#define VSOCK_CONNECT_TIMEOUT_MS 10000
/* After the host's CLOSE, how long the agent keeps writing data that already arrived. */
#define VSOCK_FLUSH_TIMEOUT_MS 10000
/* Above this many bytes queued for the host, the agent stops reading guest sockets. */
#define VSOCK_OUT_HIGH_WATER (1u << 20)
#define VSOCK_GUEST_CHANNEL_BIT 0x80000000u
#define VSOCK_PROTOCOL_VERSION 1
/* Maximum number of ports in osvm.host_ports=. models.py enforces the same limit on vm.host_ports. */
#define MAX_HOST_PORTS 32
/* How long a guest connection to a host port waits for the host's HELLO and then for OPEN_OK, in total. */
#define VSOCK_OPEN_TO_HOST_TIMEOUT_MS 10000
/* Failed guest connections to one host port are logged at most this often, because programs retry in loops. */
#define VSOCK_FAILURE_LOG_INTERVAL_MS 10000

enum vsock_frame_type {
    VSOCK_HELLO = 0,
    VSOCK_OPEN = 1,
    VSOCK_OPEN_OK = 2,
    VSOCK_OPEN_FAIL = 3,
    VSOCK_DATA = 4,
    VSOCK_CREDIT = 5,
    VSOCK_EOF = 6,
    VSOCK_CLOSE = 7,
    VSOCK_OPEN_TO_HOST = 8,
};

static const char *const vsock_frame_names[] = {"HELLO", "OPEN", "OPEN_OK", "OPEN_FAIL", "DATA",
                                                "CREDIT", "EOF", "CLOSE", "OPEN_TO_HOST"};
/* Payload length of each frame type; DATA (-1) is checked separately. */
static const int vsock_payload_length[] = {8, 8, 4, 4, -1, 4, 0, 0, 8};

/* A guest TCP listener on 127.0.0.1:<port> for the host port <port>. */
struct vsock_listener {
    uint32_t port;
    /* The listening socket, or -1 when listening failed. */
    int fd;
    /* Failed guest connections since the last log line about them, and when that line was logged (-1: never). */
    unsigned long failures;
    int64_t failure_logged_ms;
};

struct vsock_stream {
    int used;
    /* The channel id; 0 while a guest connection waits for the host's HELLO. */
    uint32_t id;
    /* The guest port for a host-opened stream, the host port for a guest-opened one. */
    uint32_t port;
    /* The guest TCP socket, or -1 once it is closed. */
    int fd;
    /* Host-opened: the connect to the guest listener is in progress. */
    int connecting;
    /* The listener that accepted a guest-opened stream, else NULL. */
    struct vsock_listener *listener;
    /* Guest-opened: waiting for the host's HELLO before OPEN_TO_HOST, then for OPEN_OK or OPEN_FAIL.
     * A stream that waits for OPEN_OK with fd -1 gave up, and keeps its id until the host's reply. */
    int awaiting_hello;
    int awaiting_open_ok;
    /* The connect or open timeout, or the flush limit after the host's CLOSE; -1 when none runs. */
    int64_t deadline_ms;
    uint32_t peer_window;
    /* DATA bytes sent to the host and not yet credited. */
    uint32_t in_flight;
    /* DATA from the host not yet written to the guest socket. */
    struct buffer to_local;
    /* Bytes written to the guest socket and not yet credited to the host. */
    uint32_t uncredited;
    int local_eof;
    int peer_eof;
    int shut_down_write;
    int sent_close;
    int received_close;
};

static struct vsock_stream vsock_streams[MAX_VSOCK_STREAMS];
static struct vsock_listener host_listeners[MAX_HOST_PORTS];
static int host_listener_count;
/* The last guest channel id handed out, without VSOCK_GUEST_CHANNEL_BIT. */
static uint32_t vsock_last_guest_id;
static int vsock_peer_ready;
/* Set after a protocol error. Input is then discarded until the host connects again. */
static int vsock_broken;

static uint32_t load_u32(const uint8_t *data) {
    uint32_t be;
    memcpy(&be, data, 4);
    return ntohl(be);
}

static void vsock_send(uint8_t type, uint32_t id, const void *payload, size_t len) {
    if (!vsock_port.connected)
        return;
    uint8_t header[VSOCK_HEADER_SIZE];
    uint32_t be_id = htonl(id), be_len = htonl((uint32_t)len);
    header[0] = type;
    memcpy(header + 1, &be_id, 4);
    memcpy(header + 5, &be_len, 4);
    buffer_append(&vsock_port.out, header, VSOCK_HEADER_SIZE);
    if (len)
        buffer_append(&vsock_port.out, payload, len);
}

static void vsock_send_u32(uint8_t type, uint32_t id, uint32_t value) {
    uint32_t be = htonl(value);
    vsock_send(type, id, &be, 4);
}

static struct vsock_stream *vsock_find(uint32_t id) {
    for (int i = 0; i < MAX_VSOCK_STREAMS; i++)
        if (vsock_streams[i].used && !vsock_streams[i].awaiting_hello && vsock_streams[i].id == id)
            return &vsock_streams[i];
    return NULL;
}

static struct vsock_stream *vsock_unused_slot(void) {
    for (int i = 0; i < MAX_VSOCK_STREAMS; i++)
        if (!vsock_streams[i].used)
            return &vsock_streams[i];
    return NULL;
}

/* Return true until the channel is open both ways: before OPEN_OK is sent or received. */
static int vsock_opening(const struct vsock_stream *stream) {
    return stream->connecting || stream->awaiting_hello || stream->awaiting_open_ok;
}

/* Make the next close() of a TCP socket send RST, so its program gets ECONNRESET instead of EOF. */
static void set_reset_on_close(int fd) {
    struct linger linger = {.l_onoff = 1, .l_linger = 0};
    if (fd >= 0)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, sizeof linger);
}

static void vsock_close_local(struct vsock_stream *stream) {
    if (stream->fd >= 0)
        close(stream->fd);
    stream->fd = -1;
    stream->connecting = 0;
    stream->deadline_ms = -1;
}

static void vsock_free(struct vsock_stream *stream) {
    vsock_close_local(stream);
    free(stream->to_local.data);
    memset(stream, 0, sizeof *stream);
    stream->fd = -1;
}

/* Close the guest socket and send CLOSE once; the slot is free when the host's CLOSE is in too. */
static void vsock_finish(struct vsock_stream *stream) {
    vsock_close_local(stream);
    if (!stream->sent_close) {
        stream->sent_close = 1;
        vsock_send(VSOCK_CLOSE, stream->id, NULL, 0);
    }
    if (stream->received_close)
        vsock_free(stream);
}

static void vsock_reset(struct vsock_stream *stream, const char *reason) {
    say("vsock: resetting channel %#x to port %u: %s", stream->id, stream->port, reason);
    set_reset_on_close(stream->fd);
    vsock_finish(stream);
}

/* Drop every channel without CLOSE and reset its guest socket, because the host side no longer
 * tracks them. Guest connections that still wait for HELLO have no channel yet, so they stay. */
static void vsock_drop_all(void) {
    for (int i = 0; i < MAX_VSOCK_STREAMS; i++) {
        if (vsock_streams[i].used && !vsock_streams[i].awaiting_hello) {
            set_reset_on_close(vsock_streams[i].fd);
            vsock_free(&vsock_streams[i]);
        }
    }
}

static void vsock_protocol_error(const char *format, ...) {
    char reason[256];
    va_list args;
    va_start(args, format);
    vsnprintf(reason, sizeof reason, format, args);
    va_end(args);
    say("vsock: protocol error from the host, dropping every channel until it reconnects: %s", reason);
    vsock_drop_all();
    vsock_broken = 1;
    vsock_peer_ready = 0;
}

static void vsock_open(uint32_t id, uint32_t port, uint32_t window) {
    if (id & VSOCK_GUEST_CHANNEL_BIT) {
        vsock_protocol_error("OPEN uses channel id %#x, which belongs to the guest", id);
        return;
    }
    if (vsock_find(id)) {
        vsock_protocol_error("OPEN reuses channel %#x, which is still open", id);
        return;
    }
    if (window == 0) {
        vsock_protocol_error("OPEN on channel %#x offers a window of 0 bytes", id);
        return;
    }
    struct vsock_stream *stream = vsock_unused_slot();
    if (stream == NULL) {
        vsock_send_u32(VSOCK_OPEN_FAIL, id, EMFILE);
        return;
    }
    /* TCP ports are 16-bit, so nothing can listen on a larger vsock port. */
    if (port > 65535) {
        vsock_send_u32(VSOCK_OPEN_FAIL, id, ECONNREFUSED);
        return;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        vsock_send_u32(VSOCK_OPEN_FAIL, id, (uint32_t)errno);
        return;
    }
    /* The host batches the stream already, so Nagle's algorithm would only delay small requests. */
    int enable = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &enable, sizeof enable);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int result = connect(fd, (struct sockaddr *)&address, sizeof address);
    if (result != 0 && errno != EINPROGRESS) {
        vsock_send_u32(VSOCK_OPEN_FAIL, id, (uint32_t)errno);
        close(fd);
        return;
    }
    *stream = (struct vsock_stream){.used = 1, .id = id, .port = port, .fd = fd, .peer_window = window};
    stream->deadline_ms = -1;
    if (result != 0) {
        stream->connecting = 1;
        stream->deadline_ms = now_ms() + VSOCK_CONNECT_TIMEOUT_MS;
        return;
    }
    vsock_send_u32(VSOCK_OPEN_OK, id, VSOCK_WINDOW);
}

/* Send OPEN_OK or OPEN_FAIL for a non-blocking connect that finished or timed out. */
static void vsock_finish_connect(struct vsock_stream *stream, int timed_out) {
    int error = 0;
    socklen_t size = sizeof error;
    if (timed_out)
        error = ETIMEDOUT;
    else if (getsockopt(stream->fd, SOL_SOCKET, SO_ERROR, &error, &size) != 0)
        error = errno;
    if (error == 0) {
        stream->connecting = 0;
        stream->deadline_ms = -1;
        vsock_send_u32(VSOCK_OPEN_OK, stream->id, VSOCK_WINDOW);
        return;
    }
    vsock_send_u32(VSOCK_OPEN_FAIL, stream->id, (uint32_t)error);
    vsock_free(stream);
}

/* --- guest connections to host ports (OPEN_TO_HOST) --------------------------------------- */

/* Log why a guest connection to a host port failed. After the first line, at most one line per
 * VSOCK_FAILURE_LOG_INTERVAL_MS, with the number of failures since the last one. */
static void vsock_log_failure(struct vsock_listener *listener, const char *format, ...) {
    int64_t now = now_ms();
    listener->failures++;
    if (listener->failure_logged_ms >= 0 && now - listener->failure_logged_ms < VSOCK_FAILURE_LOG_INTERVAL_MS)
        return;
    char reason[256];
    va_list args;
    va_start(args, format);
    vsnprintf(reason, sizeof reason, format, args);
    va_end(args);
    say("vsock: closing a guest connection to host port %u: %s (%lu failed connections to this port since the "
        "last such line)", listener->port, reason, listener->failures);
    listener->failures = 0;
    listener->failure_logged_ms = now;
}

/* Return an unused guest channel id, round robin from 0x80000001 to 0xFFFFFFFF, so that a freed id
 * is not reused soon. */
static uint32_t vsock_allocate_guest_id(void) {
    for (;;) {
        vsock_last_guest_id = vsock_last_guest_id % (VSOCK_GUEST_CHANNEL_BIT - 1) + 1;
        uint32_t id = VSOCK_GUEST_CHANNEL_BIT | vsock_last_guest_id;
        if (vsock_find(id) == NULL)
            return id;
    }
}

static void vsock_open_to_host(struct vsock_stream *stream) {
    stream->id = vsock_allocate_guest_id();
    stream->awaiting_hello = 0;
    stream->awaiting_open_ok = 1;
    uint32_t payload[2] = {htonl(stream->port), htonl(VSOCK_WINDOW)};
    vsock_send(VSOCK_OPEN_TO_HOST, stream->id, payload, sizeof payload);
}

static void vsock_handle_open_ok(struct vsock_stream *stream, uint32_t window) {
    if (window == 0) {
        vsock_protocol_error("OPEN_OK on channel %#x offers a window of 0 bytes", stream->id);
        return;
    }
    stream->awaiting_open_ok = 0;
    stream->deadline_ms = -1;
    stream->peer_window = window;
    /* The guest connection gave up waiting, so the late channel is closed at once. */
    if (stream->fd < 0)
        vsock_finish(stream);
}

static void vsock_handle_open_fail(struct vsock_stream *stream, uint32_t code) {
    if (stream->fd >= 0) {
        vsock_log_failure(stream->listener, "the host sent OPEN_FAIL with errno %u (%s): check that a host program "
                          "listens on vsock.sock_%u", code, strerror((int)code), stream->port);
        set_reset_on_close(stream->fd);
    }
    /* OPEN_FAIL frees the channel id without a CLOSE exchange. */
    vsock_free(stream);
}

/* Send OPEN_TO_HOST once the host's HELLO is in, and reset a guest connection that waited too long. */
static void vsock_service_open_to_host(struct vsock_stream *stream, int64_t now) {
    if (stream->awaiting_hello && vsock_peer_ready) {
        vsock_open_to_host(stream);
        return;
    }
    if (stream->fd < 0 || now < stream->deadline_ms)
        return;
    set_reset_on_close(stream->fd);
    if (stream->awaiting_hello) {
        vsock_log_failure(stream->listener, "the host's vsock multiplexer sent no HELLO within %d ms",
                          VSOCK_OPEN_TO_HOST_TIMEOUT_MS);
        vsock_free(stream);
        return;
    }
    vsock_log_failure(stream->listener, "the host did not respond to OPEN_TO_HOST within %d ms",
                      VSOCK_OPEN_TO_HOST_TIMEOUT_MS);
    /* The channel id stays reserved until OPEN_OK or OPEN_FAIL arrives, so a late reply finds it. */
    vsock_close_local(stream);
}

/* Accept the guest connections waiting on a host port's listener. Each waits for OPEN_TO_HOST in vsock_service. */
static void vsock_accept(struct vsock_listener *listener) {
    for (;;) {
        int fd = accept4(listener->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN)
                say("vsock: accepting a guest connection to host port %u failed: %s", listener->port, strerror(errno));
            return;
        }
        struct vsock_stream *stream = vsock_unused_slot();
        if (stream == NULL) {
            vsock_log_failure(listener, "all %d vsock channels are in use", MAX_VSOCK_STREAMS);
            set_reset_on_close(fd);
            close(fd);
            continue;
        }
        /* The host batches the stream already, so Nagle's algorithm would only delay small requests. */
        int enable = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &enable, sizeof enable);
        *stream = (struct vsock_stream){
            .used = 1, .port = listener->port, .fd = fd, .listener = listener, .awaiting_hello = 1};
        stream->deadline_ms = now_ms() + VSOCK_OPEN_TO_HOST_TIMEOUT_MS;
    }
}

static int listen_on_loopback(uint32_t port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int enable = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &enable, sizeof enable);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&address, sizeof address) != 0 || listen(fd, SOMAXCONN) != 0) {
        int error = errno;
        close(fd);
        errno = error;
        return -1;
    }
    return fd;
}

/* Listen on 127.0.0.1:P for each host port P in osvm.host_ports=P1,P2 on the kernel command line.
 * The last occurrence of the parameter counts, so osvm's own (appended after vm.kernel_args) wins. */
static void open_host_port_listeners(void) {
    static char cmdline[4096];
    if (read_file("/proc/cmdline", cmdline, sizeof cmdline) <= 0)
        return;
    char *list = NULL, *word_state = NULL;
    for (char *word = strtok_r(cmdline, " \t\n", &word_state); word; word = strtok_r(NULL, " \t\n", &word_state))
        if (strncmp(word, "osvm.host_ports=", 16) == 0)
            list = word + 16;
    if (list == NULL)
        return;
    char *item_state = NULL;
    for (char *item = strtok_r(list, ",", &item_state); item; item = strtok_r(NULL, ",", &item_state)) {
        char *end;
        unsigned long port = strtoul(item, &end, 10);
        if (*end != '\0' || port < 1 || port > 65535) {
            announce("vsock: ignoring invalid host port \"%s\" in osvm.host_ports: use numbers from 1 to 65535", item);
            continue;
        }
        int listed = 0;
        for (int i = 0; i < host_listener_count; i++)
            listed |= host_listeners[i].port == port;
        if (listed)
            continue;
        if (host_listener_count == MAX_HOST_PORTS) {
            announce("vsock: osvm.host_ports lists more than %d ports: ignoring %lu and the ports after it",
                     MAX_HOST_PORTS, port);
            break;
        }
        struct vsock_listener *listener = &host_listeners[host_listener_count++];
        *listener = (struct vsock_listener){.port = (uint32_t)port, .failure_logged_ms = -1};
        listener->fd = listen_on_loopback(listener->port);
        if (listener->fd < 0)
            announce("vsock: cannot listen on 127.0.0.1:%lu for host port %lu: %s. Guest programs cannot reach "
                     "vsock.sock_%lu: free that guest port or remove it from vm.host_ports", port, port,
                     strerror(errno), port);
    }
}

static void vsock_handle_data(struct vsock_stream *stream, const uint8_t *payload, size_t len) {
    if (stream->sent_close)
        return;
    if (vsock_opening(stream)) {
        vsock_protocol_error("DATA on channel %#x before OPEN_OK", stream->id);
        return;
    }
    if (stream->peer_eof) {
        vsock_reset(stream, "the host sent DATA after EOF");
        return;
    }
    if (stream->to_local.len + stream->uncredited + len > VSOCK_WINDOW) {
        vsock_reset(stream, "the host sent DATA beyond the window");
        return;
    }
    buffer_append(&stream->to_local, payload, len);
}

static void vsock_handle_credit(struct vsock_stream *stream, uint32_t credit) {
    if (stream->sent_close)
        return;
    if (credit > stream->in_flight) {
        vsock_reset(stream, "the host credited more bytes than were sent");
        return;
    }
    stream->in_flight -= credit;
}

static void vsock_handle_close(struct vsock_stream *stream) {
    stream->received_close = 1;
    if (stream->sent_close) {
        vsock_free(stream);
        return;
    }
    if (vsock_opening(stream)) {
        vsock_protocol_error("CLOSE on channel %#x before OPEN_OK", stream->id);
        return;
    }
    /* Deliver what already arrived, for at most VSOCK_FLUSH_TIMEOUT_MS, then close. */
    stream->deadline_ms = now_ms() + VSOCK_FLUSH_TIMEOUT_MS;
}

static void vsock_handle_frame(uint8_t type, uint32_t id, const uint8_t *payload, size_t len) {
    if (type == VSOCK_HELLO) {
        if (memcmp(payload, "OSVM", 4) != 0 || load_u32(payload + 4) != VSOCK_PROTOCOL_VERSION) {
            vsock_protocol_error("HELLO has a wrong magic or version %u, expected OSVM version %d",
                                 load_u32(payload + 4), VSOCK_PROTOCOL_VERSION);
            return;
        }
        /* A second HELLO means the host side restarted and forgot every channel. */
        if (vsock_peer_ready)
            vsock_drop_all();
        vsock_peer_ready = 1;
        return;
    }
    if (!vsock_peer_ready) {
        vsock_protocol_error("%s frame before HELLO", vsock_frame_names[type]);
        return;
    }
    if (type == VSOCK_OPEN) {
        vsock_open(id, load_u32(payload), load_u32(payload + 4));
        return;
    }
    if (type == VSOCK_OPEN_TO_HOST) {
        vsock_protocol_error("the host sent OPEN_TO_HOST, which only the guest sends");
        return;
    }
    struct vsock_stream *stream = vsock_find(id);
    if (stream == NULL)
        return; /* A frame that crossed the agent's CLOSE, or one for a dropped channel. */
    switch (type) {
    case VSOCK_OPEN_OK:
    case VSOCK_OPEN_FAIL:
        if (!stream->awaiting_open_ok)
            vsock_protocol_error("%s for channel %#x, which is not opening", vsock_frame_names[type], id);
        else if (type == VSOCK_OPEN_OK)
            vsock_handle_open_ok(stream, load_u32(payload));
        else
            vsock_handle_open_fail(stream, load_u32(payload));
        break;
    case VSOCK_DATA:
        vsock_handle_data(stream, payload, len);
        break;
    case VSOCK_CREDIT:
        vsock_handle_credit(stream, load_u32(payload));
        break;
    case VSOCK_EOF:
        stream->peer_eof = 1;
        break;
    case VSOCK_CLOSE:
        vsock_handle_close(stream);
        break;
    }
}

static int vsock_header_valid(uint8_t type, uint32_t id, uint32_t len) {
    if (type > VSOCK_OPEN_TO_HOST) {
        vsock_protocol_error("unknown frame type %u on channel %#x", type, id);
        return 0;
    }
    if (type == VSOCK_DATA ? (len < 1 || len > VSOCK_MAX_PAYLOAD) : (int)len != vsock_payload_length[type]) {
        vsock_protocol_error("%s frame on channel %#x has payload length %u", vsock_frame_names[type], id, len);
        return 0;
    }
    if ((type == VSOCK_HELLO) != (id == 0)) {
        vsock_protocol_error("%s frame on channel %#x: HELLO and only HELLO uses channel 0",
                             vsock_frame_names[type], id);
        return 0;
    }
    return 1;
}

static void vsock_parse(void) {
    struct buffer *in = &vsock_port.in;
    size_t offset = 0;
    while (!vsock_broken && in->len - offset >= VSOCK_HEADER_SIZE) {
        const uint8_t *header = in->data + offset;
        uint32_t id = load_u32(header + 1), len = load_u32(header + 5);
        if (!vsock_header_valid(header[0], id, len))
            break;
        if (in->len - offset - VSOCK_HEADER_SIZE < len)
            break;
        vsock_handle_frame(header[0], id, header + VSOCK_HEADER_SIZE, len);
        offset += VSOCK_HEADER_SIZE + len;
    }
    if (vsock_broken)
        in->len = 0;
    else
        buffer_consume(in, offset);
}

static void vsock_on_connected(void) {
    vsock_drop_all();
    vsock_port.in.len = 0;
    vsock_port.out.len = 0;
    vsock_peer_ready = 0;
    vsock_broken = 0;
    uint8_t hello[8] = {'O', 'S', 'V', 'M'};
    uint32_t version = htonl(VSOCK_PROTOCOL_VERSION);
    memcpy(hello + 4, &version, 4);
    vsock_send(VSOCK_HELLO, 0, hello, sizeof hello);
    vsock_flush_port();
}

static void vsock_on_disconnected(void) {
    vsock_drop_all();
    vsock_port.in.len = 0;
    vsock_port.out.len = 0;
    vsock_peer_ready = 0;
}

/* Write queued frames to the port. The stream has one client, so a write may end inside a frame. */
static void vsock_flush_port(void) {
    while (vsock_port.connected && vsock_port.out.len > 0) {
        size_t chunk = vsock_port.out.len < 32768 ? vsock_port.out.len : 32768;
        ssize_t n = write(vsock_port.fd, vsock_port.out.data, chunk);
        if (n > 0) {
            buffer_consume(&vsock_port.out, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        return; /* On EAGAIN, poll waits for POLLOUT. Other errors show up as POLLHUP. */
    }
}

static int vsock_wants_read(const struct vsock_stream *stream) {
    return stream->fd >= 0 && !vsock_opening(stream) && !stream->local_eof && !stream->received_close &&
           !stream->sent_close && stream->in_flight < stream->peer_window &&
           vsock_port.out.len < VSOCK_OUT_HIGH_WATER;
}

/* Return the poll events that the stream waits for, 0 when it waits for none. */
static short vsock_poll_events(const struct vsock_stream *stream) {
    if (!stream->used || stream->fd < 0)
        return 0;
    if (stream->connecting)
        return POLLOUT;
    short events = vsock_wants_read(stream) ? POLLIN : 0;
    if (stream->to_local.len)
        events |= POLLOUT;
    return events;
}

static void vsock_write_local(struct vsock_stream *stream) {
    while (stream->fd >= 0 && stream->to_local.len > 0) {
        ssize_t n = send(stream->fd, stream->to_local.data, stream->to_local.len, MSG_NOSIGNAL);
        if (n > 0) {
            buffer_consume(&stream->to_local, (size_t)n);
            stream->uncredited += (uint32_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            break;
        vsock_reset(stream, strerror(errno));
        return;
    }
    /* Batch credits, but never hold them back once everything is written, or the host stalls. */
    if (stream->uncredited && (stream->uncredited >= VSOCK_WINDOW / 4 || stream->to_local.len == 0)) {
        vsock_send_u32(VSOCK_CREDIT, stream->id, stream->uncredited);
        stream->uncredited = 0;
    }
    if (stream->fd >= 0 && stream->peer_eof && stream->to_local.len == 0 && !stream->shut_down_write) {
        shutdown(stream->fd, SHUT_WR);
        stream->shut_down_write = 1;
    }
}

static void vsock_read_local(struct vsock_stream *stream) {
    static uint8_t chunk[VSOCK_DATA_CHUNK];
    while (vsock_wants_read(stream)) {
        size_t room = stream->peer_window - stream->in_flight;
        ssize_t n = read(stream->fd, chunk, room < sizeof chunk ? room : sizeof chunk);
        if (n > 0) {
            stream->in_flight += (uint32_t)n;
            vsock_send(VSOCK_DATA, stream->id, chunk, (size_t)n);
            continue;
        }
        if (n == 0) {
            stream->local_eof = 1;
            vsock_send(VSOCK_EOF, stream->id, NULL, 0);
            return;
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN)
            vsock_reset(stream, strerror(errno));
        return;
    }
}

/* Move data for one stream after poll, and close it once both directions ended. */
static void vsock_service(struct vsock_stream *stream, short revents, int64_t now) {
    if (!stream->used)
        return;
    if (stream->awaiting_hello || stream->awaiting_open_ok) {
        vsock_service_open_to_host(stream, now);
        return;
    }
    if (stream->connecting) {
        if (revents)
            vsock_finish_connect(stream, 0);
        else if (now >= stream->deadline_ms)
            vsock_finish_connect(stream, 1);
        return;
    }
    if (stream->fd >= 0 && (stream->to_local.len || (stream->peer_eof && !stream->shut_down_write)))
        vsock_write_local(stream);
    if (stream->used && (revents & (POLLIN | POLLHUP | POLLERR)))
        vsock_read_local(stream);
    if (!stream->used || stream->sent_close)
        return;
    int both_ended = stream->local_eof && stream->peer_eof && stream->to_local.len == 0;
    int flushed = stream->received_close && (stream->to_local.len == 0 || now >= stream->deadline_ms);
    if (both_ended || flushed)
        vsock_finish(stream);
}

/*
 * The guest learns of connections through control messages that virtio_console handles apart
 * from the data, so bytes from the next client can be read before the previous client's
 * disconnection is seen. Hence nothing read or queued is dropped on a disconnection: requests get
 * their replies in order, replies carry the request id, and clients skip frames that are not theirs.
 * Exec requests also run to completion (or their timeout) when their client goes away. A
 * disconnection that a new connection follows at once can go unseen, and then no HELLO is sent, so
 * the host requests one with HELLO_REQUEST.
 */
static void on_connected(struct channel *channel) {
    channel->connected = 1;
    if (channel == &vsock_port)
        vsock_on_connected();
    else
        send_hello(channel);
}

static void on_disconnected(struct channel *channel) {
    channel->connected = 0;
    if (channel == &vsock_port)
        vsock_on_disconnected();
}

/* Check whether the host side of a disconnected port has connected, without blocking. */
static void check_connection(struct channel *channel) {
    if (channel->fd < 0 || channel->connected)
        return;
    struct pollfd pfd = {.fd = channel->fd, .events = POLLOUT};
    if (poll(&pfd, 1, 0) == 1 && !(pfd.revents & POLLHUP) && (pfd.revents & POLLOUT))
        on_connected(channel);
}

static void read_channel(struct channel *channel) {
    uint8_t chunk[16384];
    int host_closed = 0;
    for (;;) {
        ssize_t n = read(channel->fd, chunk, sizeof chunk);
        if (n > 0) {
            buffer_append(&channel->in, chunk, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        /* read() returns 0 once the port has no data and the host side is not connected. */
        host_closed = n == 0;
        break;
    }
    if (channel == &vsock_port)
        vsock_parse();
    else
        parse_frames(channel);
    if (host_closed)
        on_disconnected(channel);
}

static void read_power_button(int fd) {
    struct input_event event;
    while (read(fd, &event, sizeof event) == (ssize_t)sizeof event)
        if (event.type == EV_KEY && event.code == KEY_POWER && event.value == 1)
            request_shutdown("ACPI power button");
}

static void read_signals(void) {
    struct signalfd_siginfo info;
    while (read(signal_fd, &info, sizeof info) == (ssize_t)sizeof info) {
        switch (info.ssi_signo) {
        case SIGCHLD:
            reap_children();
            break;
        case SIGIO:
            check_connection(&control);
            check_connection(&exec_channel);
            check_connection(&vsock_port);
            break;
        case SIGTERM:
        case SIGPWR:
        case SIGINT:
            request_shutdown("signal to PID 1");
            break;
        default:
            break;
        }
    }
}

/* --- main loop ---------------------------------------------------------------------------- */

static void run(void) {
    struct channel *channels[] = {&control, &exec_channel, &vsock_port};
    const int channel_count = 3;
    for (;;) {
        struct pollfd fds[8 + MAX_INPUTS + MAX_EXEC_JOBS + MAX_HOST_PORTS + MAX_VSOCK_STREAMS];
        int count = 0;
        fds[count++] = (struct pollfd){.fd = signal_fd, .events = POLLIN};
        int channel_index[3];
        for (int i = 0; i < channel_count; i++) {
            channel_index[i] = -1;
            if (channels[i]->fd < 0 || !channels[i]->connected)
                continue;
            short events = POLLIN | (channels[i]->out.len ? POLLOUT : 0);
            channel_index[i] = count;
            fds[count++] = (struct pollfd){.fd = channels[i]->fd, .events = events};
        }
        int log_index = -1;
        if (log_fd >= 0 && log_pending.len) {
            log_index = count;
            fds[count++] = (struct pollfd){.fd = log_fd, .events = POLLOUT};
        }
        int output_index = -1;
        if (component_out >= 0 && log_pending.len < LOG_HIGH_WATER) {
            output_index = count;
            fds[count++] = (struct pollfd){.fd = component_out, .events = POLLIN};
        }
        int check_index = -1;
        if (component_exec_check >= 0) {
            check_index = count;
            fds[count++] = (struct pollfd){.fd = component_exec_check, .events = POLLIN};
        }
        int input_index = count;
        for (int i = 0; i < input_count; i++)
            fds[count++] = (struct pollfd){.fd = input_fds[i], .events = POLLIN};
        int job_index = count;
        int job_slot[MAX_EXEC_JOBS];
        int job_count = 0;
        for (int i = 0; i < MAX_EXEC_JOBS; i++) {
            if (jobs[i].used && jobs[i].out_fd >= 0) {
                job_slot[job_count++] = i;
                fds[count++] = (struct pollfd){.fd = jobs[i].out_fd, .events = POLLIN};
            }
        }
        int listener_index = count;
        for (int i = 0; i < host_listener_count; i++)
            fds[count++] = (struct pollfd){.fd = host_listeners[i].fd, .events = POLLIN};
        /* A stream that waits for no event gets fd -1, which poll() skips, so a hung-up socket
         * that is not being read does not wake the loop again and again. */
        int stream_index = count;
        for (int i = 0; i < MAX_VSOCK_STREAMS; i++) {
            short events = vsock_poll_events(&vsock_streams[i]);
            fds[count++] = (struct pollfd){.fd = events ? vsock_streams[i].fd : -1, .events = events};
        }

        int64_t now = now_ms();
        int64_t wake = now + RECONNECT_CHECK_MS;
        if (kill_deadline_ms >= 0 && kill_deadline_ms < wake)
            wake = kill_deadline_ms;
        for (int i = 0; i < MAX_EXEC_JOBS; i++) {
            if (jobs[i].used && jobs[i].deadline_ms >= 0 && jobs[i].deadline_ms < wake)
                wake = jobs[i].deadline_ms;
            if (jobs[i].used && jobs[i].alive_until_ms >= 0 && jobs[i].alive_until_ms < wake)
                wake = jobs[i].alive_until_ms;
        }
        for (int i = 0; i < MAX_VSOCK_STREAMS; i++)
            if (vsock_streams[i].used && vsock_streams[i].deadline_ms >= 0 && vsock_streams[i].deadline_ms < wake)
                wake = vsock_streams[i].deadline_ms;
        int timeout = wake > now ? (int)(wake - now) : 0;

        int ready = poll(fds, count, timeout);
        if (ready < 0 && errno != EINTR) {
            say("poll failed: %s", strerror(errno));
            sleep_ms(100);
            continue;
        }

        if (fds[0].revents)
            read_signals();
        for (int i = 0; i < channel_count; i++) {
            int index = channel_index[i];
            if (index < 0 || !channels[i]->connected)
                continue;
            if (fds[index].revents & (POLLIN | POLLHUP | POLLERR))
                read_channel(channels[i]);
            if (channels[i]->connected && (fds[index].revents & POLLOUT))
                flush_channel(channels[i]);
        }
        if (log_index >= 0 && fds[log_index].revents)
            flush_log();
        if (output_index >= 0 && fds[output_index].revents)
            drain_component_output();
        if (check_index >= 0 && fds[check_index].revents && component_exec_check >= 0)
            on_exec_check(start_argv);
        for (int i = 0; i < input_count; i++)
            if (fds[input_index + i].revents & POLLIN)
                read_power_button(input_fds[i]);
        for (int i = 0; i < job_count; i++)
            if (fds[job_index + i].revents)
                read_job_output(&jobs[job_slot[i]]);

        for (int i = 0; i < host_listener_count; i++)
            if (fds[listener_index + i].revents & POLLIN)
                vsock_accept(&host_listeners[i]);

        now = now_ms();
        for (int i = 0; i < MAX_VSOCK_STREAMS; i++)
            vsock_service(&vsock_streams[i], fds[stream_index + i].revents, now);
        vsock_flush_port();
        if (kill_deadline_ms >= 0 && now >= kill_deadline_ms) {
            announce("the component did not exit within %u ms of signal %d: sending SIGKILL", grace_ms, stop_signal);
            kill(-component_pid, SIGKILL);
            kill(component_pid, SIGKILL);
            kill_deadline_ms = -1;
        }
        for (int i = 0; i < MAX_EXEC_JOBS; i++) {
            /* A missed keepalive means the client went away, as when a probe times out and is killed. */
            int expired = jobs[i].used && jobs[i].deadline_ms >= 0 && now >= jobs[i].deadline_ms;
            int abandoned = jobs[i].used && jobs[i].alive_until_ms >= 0 && now >= jobs[i].alive_until_ms;
            if (expired || abandoned) {
                kill(-jobs[i].pid, SIGKILL);
                jobs[i].deadline_ms = -1;
                jobs[i].alive_until_ms = -1;
            }
        }
        for (int i = 0; i < channel_count; i++)
            check_connection(channels[i]);
    }
}

int main(void) {
    setenv("PATH", DEFAULT_PATH, 1);
    umask(022);
    mount_basics();
    load_modules();
    switch_to_root_disk();
    configure_network();

    sigemptyset(&handled_signals);
    int signals[] = {SIGCHLD, SIGIO, SIGTERM, SIGINT, SIGPWR, SIGHUP, SIGUSR1, SIGUSR2};
    for (size_t i = 0; i < sizeof signals / sizeof signals[0]; i++)
        sigaddset(&handled_signals, signals[i]);
    sigprocmask(SIG_BLOCK, &handled_signals, NULL);
    signal_fd = signalfd(-1, &handled_signals, SFD_NONBLOCK | SFD_CLOEXEC);
    /* Ctrl-Alt-Del becomes SIGINT to PID 1 instead of an immediate reboot. */
    reboot(RB_DISABLE_CAD);

    open_ports();
    /* Before START, so the listeners are there when the component starts. */
    open_host_port_listeners();
    open_power_button();
    for (int i = 0; i < MAX_EXEC_JOBS; i++)
        jobs[i].out_fd = -1;
    say("ready for the host");
    check_connection(&control);
    check_connection(&exec_channel);
    check_connection(&vsock_port);
    run();
    return 0;
}
