using System.CommandLine;
using System.Globalization;
using DmaBroker.Client;
using DmaBroker.Protocol;
using DmaBroker.Protocol.V1;

namespace DmaBroker.Ctl;

/// <summary>dmactl fault and faults: inject faults into devices (SPEC §14), list them, clear them (admin; listing: viewer).</summary>
internal static class FaultCommands
{
    public static readonly Argument<string> Kind = new Argument<string>("kind")
    {
        Description = "What the fault does: " + string.Join(", ", FaultNames.All),
    }.AcceptOnlyFromAmong([.. FaultNames.All]);

    public static readonly Option<uint> Count = Number<uint>("--count", "How many matching events fire before the fault is spent; 0 = until cleared", "N");
    public static readonly Option<uint> DelayMs = Number<uint>("--delay-ms", "delay-interrupt: how late; slow-reset: how long the reset takes (1 to 600000)", "MS");
    public static readonly Option<uint> Status = Number<uint>("--status", "device-error on nvme: the NVMe Status Field to complete with, such as 0x281 (default Data Transfer Error)", "SF");
    public static readonly Option<uint> Probability = Number<uint>("--probability", "The percentage of matching events that fire, 1 to 100 (default 100)", "PERCENT");
    public static readonly Option<ulong> Seed = Number<ulong>("--seed", "The seed of the probability draws: the same seed replays the same firings", "N");
    public static readonly Option<uint?> Opcode = Number<uint?>("--opcode", "device-error on nvme: only I/O commands with this opcode, such as 0x02 (Read)", "OP");
    public static readonly Option<ulong> LbaStart = Number<ulong>("--lba-start", "device-error on nvme: the first LBA of the range a Read or Write must overlap", "LBA");
    public static readonly Option<ulong> LbaCount = Number<ulong>("--lba-count", "device-error on nvme: the LBAs in that range", "N");
    public static readonly Option<string?> Clear = new("--clear")
    {
        Description = "Remove the faults of this device ('all': of every device) instead of listing",
        HelpName = "address",
    };

    /// <summary>A whole-number option, decimal or 0x-hex; anything else is a usage error that says so.</summary>
    private static Option<T> Number<T>(string name, string description, string helpName) => new(name)
    {
        Description = description,
        HelpName = helpName,
        CustomParser = result =>
        {
            var text = result.Tokens.Single().Value;
            var hex = text.StartsWith("0x", StringComparison.OrdinalIgnoreCase);
            var style = hex ? NumberStyles.AllowHexSpecifier : NumberStyles.None;
            if (ulong.TryParse(hex ? text[2..] : text, style, CultureInfo.InvariantCulture, out var value) && Fits<T>(value))
                return (T)Convert.ChangeType(value, Nullable.GetUnderlyingType(typeof(T)) ?? typeof(T), CultureInfo.InvariantCulture);
            result.AddError($"{name} takes a whole number (decimal or 0x-hex), got '{text}'");
            return default!;
        },
    };

    private static bool Fits<T>(ulong value) => (Nullable.GetUnderlyingType(typeof(T)) ?? typeof(T)) == typeof(ulong) || value <= uint.MaxValue;

    public static async Task<int> FaultAsync(CommandContext c)
    {
        var address = c.Value(Commands.Address);
        var kind = FaultNames.Parse(c.Value(Kind)) ?? throw new UsageException($"unknown fault kind '{c.Value(Kind)}'");
        var fault = new FaultInjection(address, kind)
        {
            Count = c.Value(Count),
            Delay = TimeSpan.FromMilliseconds(c.Value(DelayMs)),
            Status = c.Value(Status),
            ProbabilityPercent = c.Value(Probability),
            Seed = c.Value(Seed),
            Opcode = c.Value(Opcode),
            LbaStart = c.Value(LbaStart),
            LbaCount = c.Value(LbaCount),
        };
        var id = await c.Client.Admin.InjectFaultAsync(fault, c.Stop);
        var name = FaultNames.Of(kind);
        c.Output.Result(kind is FaultKind.SurpriseRemove or FaultKind.LinkDown
                ? $"fault {id}: {name} on {address}, done"
                : $"fault {id}: {name} armed on {address}",
            ("faultId", id), ("address", address), ("kind", name));
        return Cli.Ok;
    }

    public static async Task<int> FaultsAsync(CommandContext c)
    {
        if (c.Value(Clear) is { } clear)
        {
            var all = string.Equals(clear, "all", StringComparison.OrdinalIgnoreCase);
            var cleared = await c.Client.Admin.ClearFaultsAsync(all ? null : clear, c.Stop);
            c.Output.Result($"cleared {cleared} fault(s) {(all ? "of every device" : $"of {clear}")}", ("cleared", cleared), ("address", all ? "" : clear));
            return Cli.Ok;
        }
        var faults = await c.Client.Admin.ListFaultsAsync(c.Stop);
        if (c.Output.Json)
        {
            var response = new ListFaultsResponse();
            response.Faults.AddRange(faults);
            c.Output.Message(response);
            return Cli.Ok;
        }
        c.Output.Table(["ID", "ADDRESS", "KIND", "SETTINGS", "FIRED"],
            faults.Select(f => new Cell[]
            {
                f.FaultId.ToString(CultureInfo.InvariantCulture), f.Address, FaultNames.Of(f.Kind),
                FaultNames.Settings(f) is { Length: > 0 } settings ? settings : "-",
                f.Spent ? $"{f.Fired} (spent)" : f.Fired.ToString(CultureInfo.InvariantCulture),
            }));
        return Cli.Ok;
    }
}
