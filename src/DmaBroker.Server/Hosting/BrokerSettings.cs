using System.Collections;
using System.ComponentModel;
using System.Globalization;
using System.Reflection;
using DmaBroker.Core;
using Microsoft.Extensions.Configuration.CommandLine;
using Microsoft.Extensions.Configuration.EnvironmentVariables;

namespace DmaBroker.Server.Hosting;

/// <summary>
/// Where the broker's settings come from (SPEC §13), strongest first: the command line, the
/// environment (<c>DMABROKER_LEASE_TTL_MS</c>, named after the option, or <c>DmaBroker__LeaseTtlMs</c>,
/// named after the setting), then <c>appsettings.json</c> in the content root (the working
/// directory). Every value is checked before the broker starts, and a bad one is named by where it
/// came from: the option, the variable or the file.
/// </summary>
internal static class BrokerSettings
{
    /// <summary>The prefix of the broker's own environment variables.</summary>
    public const string Prefix = "DMABROKER_";

    /// <summary>Variables of the clients (dmactl, the client library) that share the prefix: the broker leaves them alone.</summary>
    public static readonly IReadOnlySet<string> ClientVariables = new HashSet<string>(StringComparer.Ordinal) { "DMABROKER_TOKEN", "DMABROKER_ADDRESS" };

    /// <summary>The variable that stands for an option: <c>--lease-ttl-ms</c> is <c>DMABROKER_LEASE_TTL_MS</c>.</summary>
    public static string VariableOf(string option) =>
        Prefix + option.TrimStart('-').Replace('-', '_').ToUpperInvariant();

    /// <summary>
    /// Adds the <c>DMABROKER_*</c> variables, just above the environment's <c>DmaBroker__*</c> ones.
    /// With <paramref name="environment"/> (tests), its variables stand in for the process's, both forms.
    /// Returns the <c>DMABROKER_*</c> variables that name no option (to be logged, not obeyed).
    /// </summary>
    /// <param name="configuration">The builder's configuration, before the command line is added.</param>
    /// <param name="environment">Variables instead of the process's own, or null for the process's.</param>
    /// <param name="options">Each long option and the setting it sets.</param>
    public static IReadOnlyList<string> AddEnvironment(ConfigurationManager configuration, IDictionary? environment, IReadOnlyDictionary<string, string> options)
    {
        var sources = configuration.Sources;
        var plain = sources.Select((s, i) => (s, i)).LastOrDefault(x => x.s is EnvironmentVariablesConfigurationSource { Prefix: null or "" });
        var at = plain.s is null ? sources.Count : plain.i + 1;
        if (environment is not null)
        {
            for (var i = sources.Count - 1; i >= 0; i--)
            {
                if (sources[i] is EnvironmentVariablesConfigurationSource)
                {
                    sources.RemoveAt(i);
                    if (i < at)
                        at--;
                }
            }
        }
        var settings = new EnvironmentSettings(environment ?? Environment.GetEnvironmentVariables(), options, withSettingNames: environment is not null);
        sources.Insert(at, settings);
        return settings.Ignored;
    }

    /// <summary>
    /// The broker's settings, each checked for its type first so that a bad one is named by its
    /// origin. <c>Listen</c> comes whole from the strongest source that gives it (lists would
    /// otherwise merge item by item across sources); one value may hold several addresses
    /// separated by commas or spaces.
    /// </summary>
    public static BrokerHostOptions Read(ConfigurationManager configuration, IReadOnlyDictionary<string, string> options)
    {
        var section = configuration.GetSection(BrokerHostOptions.Section);
        foreach (var setting in section.GetChildren())
        {
            var property = typeof(BrokerHostOptions).GetProperty(setting.Key, BindingFlags.Public | BindingFlags.Instance | BindingFlags.IgnoreCase)
                ?? throw new ArgumentException($"{Origin(configuration, setting.Path, options)}: the broker has no setting {BrokerHostOptions.Section}:{setting.Key}");
            var type = Nullable.GetUnderlyingType(property.PropertyType) ?? property.PropertyType;
            if (type == typeof(string[]) || type == typeof(string))
                continue;
            if (setting.Value is null)
                throw new ArgumentException($"{Origin(configuration, setting.Path, options)} takes one value, not a section");
            try
            {
                TypeDescriptor.GetConverter(type).ConvertFromInvariantString(setting.Value);
            }
            catch (Exception e) when (e is ArgumentException or FormatException or OverflowException or NotSupportedException)
            {
                throw new ArgumentException($"{Origin(configuration, setting.Path, options)} takes {Expected(type)}, got {ErrnoException.Quote(setting.Value)}", e);
            }
        }
        var read = section.Get<BrokerHostOptions>() ?? new BrokerHostOptions();
        string[] listen = ReadList(configuration, $"{BrokerHostOptions.Section}:{nameof(BrokerHostOptions.Listen)}");
        return read with { Listen = listen.Length > 0 ? listen : [BrokerHostOptions.DefaultListen] };
    }

    /// <summary>
    /// Where the value of <paramref name="key"/> comes from, for messages: the option
    /// (<c>--lease-ttl-ms</c>), the variable (<c>DMABROKER_LEASE_TTL_MS (environment)</c>) or the
    /// file (<c>DmaBroker:LeaseTtlMs (/srv/appsettings.json)</c>); the option when nothing sets it.
    /// </summary>
    public static string Origin(IConfigurationRoot configuration, string key, IReadOnlyDictionary<string, string> options)
    {
        var option = options.FirstOrDefault(o => string.Equals(o.Value, key, StringComparison.OrdinalIgnoreCase)).Key ?? $"--{key}";
        foreach (var provider in configuration.Providers.Reverse())
        {
            if (!provider.TryGet(key, out _) && !provider.GetChildKeys([], key).Any())
                continue;
            return provider switch
            {
                CommandLineConfigurationProvider => option,
                EnvironmentSettings environment => $"{environment.VariableNaming(key)} (environment)",
                EnvironmentVariablesConfigurationProvider => $"{key.Replace(":", "__", StringComparison.Ordinal)} (environment)",
                FileConfigurationProvider file => $"{key} ({file.Source.FileProvider?.GetFileInfo(file.Source.Path ?? "").PhysicalPath ?? file.Source.Path})",
                _ => option,
            };
        }
        return option;
    }

    private static string[] ReadList(IConfigurationRoot configuration, string key)
    {
        foreach (var provider in configuration.Providers.Reverse())
        {
            if (provider.TryGet(key, out var one) && !string.IsNullOrWhiteSpace(one))
                return SplitList(one);
            var items = provider.GetChildKeys([], key).Distinct(StringComparer.OrdinalIgnoreCase).Order(ConfigurationKeyComparer.Instance).ToArray();
            if (items.Length > 0)
                return [.. items.Select(i => provider.TryGet($"{key}:{i}", out var v) ? v ?? "" : "")];
        }
        return [];
    }

    private static string[] SplitList(string value) =>
        value.Split([',', ' ', '\t'], StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);

    private static string Expected(Type type) =>
        type == typeof(bool) ? "true or false"
        : type == typeof(TimeSpan) ? "a duration such as 00:00:05"
        : type == typeof(int) || type == typeof(long) || type == typeof(uint) || type == typeof(ulong) ? "a whole number"
        : $"a {type.Name}";

    /// <summary>
    /// The environment's settings as configuration: <c>DMABROKER_&lt;OPTION&gt;</c> for each option
    /// and, standing in for the process environment in tests, <c>Section__Key</c> for any setting.
    /// Remembers each key's variable, so a bad value is named as it was written.
    /// </summary>
    private sealed class EnvironmentSettings : ConfigurationProvider, IConfigurationSource
    {
        private readonly Dictionary<string, string> _variables = new(StringComparer.OrdinalIgnoreCase);

        public EnvironmentSettings(IDictionary environment, IReadOnlyDictionary<string, string> options, bool withSettingNames)
        {
            var byVariable = options.ToDictionary(o => BrokerSettings.VariableOf(o.Key), o => o.Value, StringComparer.Ordinal);
            var entries = environment.Cast<DictionaryEntry>()
                .Select(e => (Name: e.Key as string ?? "", Value: e.Value as string ?? ""))
                .OrderBy(e => e.Name, StringComparer.Ordinal)
                .ToArray();
            // The DmaBroker__ form first, so the DMABROKER_ form, named after the option, wins over it.
            if (withSettingNames)
            {
                foreach (var (name, value) in entries.Where(e => !e.Name.StartsWith(Prefix, StringComparison.Ordinal)))
                    Set(name.Replace("__", ConfigurationPath.KeyDelimiter, StringComparison.Ordinal), value, name);
            }
            foreach (var (name, value) in entries.Where(e => e.Name.StartsWith(Prefix, StringComparison.Ordinal)))
            {
                if (!byVariable.TryGetValue(name, out var key))
                {
                    if (!ClientVariables.Contains(name))
                        Ignored.Add(name);
                    continue;
                }
                if (!key.EndsWith(":" + nameof(BrokerHostOptions.Listen), StringComparison.Ordinal))
                {
                    Set(key, value, name);
                    continue;
                }
                // Several addresses in one variable; as a list, so it replaces a list from a weaker source whole.
                var addresses = SplitList(value);
                for (var i = 0; i < addresses.Length; i++)
                    Set($"{key}:{i.ToString(CultureInfo.InvariantCulture)}", addresses[i], name);
                _variables[key] = name;
            }
        }

        /// <summary>The <c>DMABROKER_*</c> variables that name no option and are no client's.</summary>
        public List<string> Ignored { get; } = [];

        public string VariableNaming(string key) => _variables.TryGetValue(key, out var name) ? name : key.Replace(":", "__", StringComparison.Ordinal);

        public IConfigurationProvider Build(IConfigurationBuilder builder) => this;

        private void Set(string key, string value, string variable)
        {
            Data[key] = value;
            _variables[key] = variable;
        }
    }
}
