// A userspace NVMe driver in the style of SPDK's hello_world, written only against DmaBroker.Client:
// hand the controller from the kernel's nvme driver to vfio-pci, claim its IOMMU group, map queues
// and buffers, reset and enable the controller, identify it, create an I/O queue pair with its
// MSI-X vector, write blocks and read them back at queue depth > 1 through PRP lists, check the
// data, shut down cleanly and give the device back to nvme (as SPDK's 'setup.sh reset').
//   dotnet run --project clients/samples/NvmeDriver -- [--broker URL] [--device 0000:01:00.0]
//       [--qd 16] [--blocks 64 (transfers each way)] [--io-size 32k (bytes, or k for KiB)]
//       [--pause-before-io (print a line and wait for one on stdin before the first I/O, to inject a fault there)]
//       [--shared (SPEC §15's local path: queues, PRP lists and data buffers are shared memory, read
//        and written as plain memory; needs a unix:// broker address)]
// Under a fault it exits 1 with one line on stderr, within CAP.TO for the controller to become
// ready and 10 s for a command; a lost or late interrupt costs 0.5 s, after which it reads the
// completion queue itself (as Linux's nvme driver does) and says so on stderr.
using System.Buffers.Binary;
using System.Globalization;
using DmaBroker.Client;
using DmaBroker.Samples.Nvme;

var broker = Option("--broker") ?? Environment.GetEnvironmentVariable(BrokerClient.AddressVariable);
var address = Option("--device") ?? "0000:01:00.0";
int queueDepth, transfers, ioSize;
try
{
    queueDepth = int.Parse(Option("--qd") ?? "16", CultureInfo.InvariantCulture);
    transfers = int.Parse(Option("--blocks") ?? "64", CultureInfo.InvariantCulture);
    ioSize = Size(Option("--io-size") ?? "32k");
}
catch (FormatException e)
{
    Console.Error.WriteLine($"nvme-driver: {e.Message}");
    return 2;
}
if (queueDepth is < 1 or > 1023 || transfers < 1 || ioSize < 512 || ioSize % 512 != 0)
{
    Console.Error.WriteLine("nvme-driver: --qd 1..1023, --blocks >= 1, --io-size a multiple of 512 bytes");
    return 2;
}
var shared = args.Contains("--shared");
if (shared && broker?.StartsWith("unix://", StringComparison.Ordinal) != true)
{
    Console.Error.WriteLine($"nvme-driver: --shared needs a unix:// broker address (--broker unix:///path/to/socket), not '{broker}': the broker shares memory only with clients on its own host");
    return 2;
}
var timeout = TimeSpan.FromSeconds(10);
BrokerSession? session = null;

try
{
    using var client = BrokerClient.Connect(broker);
    await using var vfio = await VfioBinding.OpenAsync(client, address, "nvme", "nvme-driver", Console.WriteLine);
    session = vfio.Session;
    await using var controller = await NvmeController.StartAsync(vfio, Console.WriteLine, shared);

    var id = await controller.IdentifyAsync();
    Console.WriteLine($"identify controller: model '{id.Model}', serial '{id.Serial}', firmware '{id.Firmware}', MDTS {id.MaxTransfer / 1024} KiB, {id.Namespaces} namespace(s)");
    Console.WriteLine($"identify namespace 1: {id.Blocks} blocks of {id.BlockSize} bytes ({id.Bytes / (1024 * 1024)} MiB)");
    if (ioSize % id.BlockSize != 0 || (id.MaxTransfer > 0 && ioSize > id.MaxTransfer) || (ulong)transfers * (ulong)ioSize > id.Bytes)
        throw new ArgumentException($"--io-size must be whole {id.BlockSize}-byte blocks, at most {id.MaxTransfer / 1024} KiB, and --blocks x --io-size at most {id.Bytes / (1024 * 1024)} MiB");
    // SPEC §15's local path: tails and heads as shared memory too, MMIO doorbells only when the controller asks (NVMe 1.3 Doorbell Buffer Config).
    var shadowDoorbells = await controller.ConfigureShadowDoorbellsAsync(id);
    var (sqs, cqs) = await controller.SetNumberOfQueuesAsync(1);
    Console.WriteLine($"number of queues: asked for 1 pair, the controller allocated {sqs} SQs and {cqs} CQs");

    const ushort Vector = 1;
    var queue = await controller.CreateIoQueuePairAsync(qid: 1, entries: queueDepth + 1, Vector);
    Console.WriteLine($"I/O queue pair 1: {queue.Entries} entries each, completions on MSI-X vector {Vector} (interrupts enabled){(shadowDoorbells ? ", shadow doorbells" : "")}");
    var buffers = await controller.MapIoBuffersAsync(queueDepth, ioSize);

    if (args.Contains("--pause-before-io"))
    {
        Console.WriteLine("paused before I/O: send a line on stdin to go on");
        await Console.In.ReadLineAsync();
    }

    var blocks = ioSize / id.BlockSize;
    var started = queue.InterruptsTaken;
    await queue.RunAsync(transfers, queueDepth,
        async (i, slot) =>
        {
            if (buffers.IsShared)
                FillPattern(i, buffers.Slot(slot, ioSize).Span);
            else
                await buffers.WriteAsync(slot, Pattern(i, ioSize));
            return buffers.Command(NvmeCommand.IoWrite, slot, (ulong)(i * blocks), blocks, id.BlockSize);
        },
        (_, _) => Task.CompletedTask, timeout);
    Console.WriteLine($"wrote {transfers} x {ioSize / 1024} KiB at LBA 0..{(transfers * blocks) - 1}, {queueDepth} in flight, woken by {queue.InterruptsTaken - started} interrupts");

    started = queue.InterruptsTaken;
    await queue.RunAsync(transfers, queueDepth,
        (i, slot) => Task.FromResult(buffers.Command(NvmeCommand.IoRead, slot, (ulong)(i * blocks), blocks, id.BlockSize)),
        async (i, slot) =>
        {
            ReadOnlyMemory<byte> data = buffers.IsShared ? buffers.Slot(slot, ioSize) : await buffers.ReadAsync(slot, ioSize);
            if (!data.Span.SequenceEqual(Pattern(i, ioSize)))
                throw new InvalidDataException($"transfer {i} (LBA {i * blocks}) read back differs from what was written (first bytes {Convert.ToHexString(data.Span[..16])})");
        },
        timeout);
    Console.WriteLine($"read back {transfers} x {ioSize / 1024} KiB, {queueDepth} in flight, woken by {queue.InterruptsTaken - started} interrupts: every byte matches");
    if (shadowDoorbells)
        Console.WriteLine($"shadow doorbells: {queue.DoorbellsRung} MMIO doorbells for {2 * transfers} commands, {queue.CompletionsSpotted} completions taken by watching the ring");
    if (queue.CompletionsPolled > 0)
        Console.Error.WriteLine($"nvme-driver: warning: {queue.CompletionsPolled} completions found by reading the completion queue after no interrupt came within {NvmeQueuePair.InterruptTimeout.TotalSeconds:0.#} s");

    await controller.DeleteIoQueuePairAsync(queue);
    Console.WriteLine("deleted I/O queue pair 1");
    await controller.ShutdownAsync();
    await controller.ReleaseAsync();
    await vfio.CloseAsync();
    Console.WriteLine($"done: {transfers} writes + {transfers} reads of {ioSize / 1024.0:0.#} KiB at QD {queueDepth}, data verified{(shared ? ", through shared memory" : "")}");
    return 0;
}
catch (BrokerException e)
{
    // A session the broker ended (its connection cut, revoked) fails the next call with EACCES;
    // its end's reason, which the event stream brings at about the same time, says why.
    if (session is not null && e.Errno == Errno.EACCES && await EndedAsync(session) is { } ended)
        Console.Error.WriteLine($"nvme-driver: session {session.Id} ended: {ended} ({e.Reason}: {e.Message})");
    else
        Console.Error.WriteLine($"nvme-driver: {e.Reason}: {e.Message}");
    return e is BrokerUnavailableException ? 3 : 1;
}
catch (Exception e) when (e is NvmeCommandException or DmaFaultException or TimeoutException or InvalidOperationException or NotSupportedException)
{
    Console.Error.WriteLine($"nvme-driver: {e.Message}");
    return 1;
}
catch (ArgumentException e)
{
    Console.Error.WriteLine($"nvme-driver: {e.Message}");
    return 2;
}
catch (InvalidDataException e)
{
    Console.Error.WriteLine($"nvme-driver: DATA CORRUPTION: {e.Message}");
    return 4;
}

static async Task<string?> EndedAsync(BrokerSession session)
{
    try
    {
        return await session.Ended.WaitAsync(TimeSpan.FromSeconds(2));
    }
    catch (TimeoutException)
    {
        return null;
    }
}

// Transfer i's bytes: its number, then bytes derived from it, so a block in the wrong place shows.
static byte[] Pattern(long transfer, int size)
{
    var data = new byte[size];
    FillPattern(transfer, data);
    return data;
}

// The same, written straight into a buffer (shared memory).
static void FillPattern(long transfer, Span<byte> data)
{
    for (var at = 0; at < data.Length; at += 512)
    {
        BinaryPrimitives.WriteInt64LittleEndian(data[at..], transfer);
        BinaryPrimitives.WriteInt32LittleEndian(data[(at + 8)..], at);
        for (var i = at + 12; i < at + 512; i++)
            data[i] = (byte)((transfer * 131) + (i * 7));
    }
}

// "4096", "32k" or "32K": bytes, or KiB with a k.
static int Size(string text) =>
    text.EndsWith('k') || text.EndsWith('K')
        ? int.Parse(text[..^1], CultureInfo.InvariantCulture) * 1024
        : int.Parse(text, CultureInfo.InvariantCulture);

string? Option(string name)
{
    var i = Array.IndexOf(args, name);
    return i >= 0 && i + 1 < args.Length ? args[i + 1] : null;
}
